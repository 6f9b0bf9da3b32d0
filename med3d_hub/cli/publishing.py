"""`med3d export`, `publish` and `compare`: a trained run -> Hub files -> a published entry; runs side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import EXIT_OK
from .options import UserError, add_command
from .output import PROG, say

EXPORT_EPILOG = f"""\
examples:
  {PROG} export runs/3dseg8 --output export/ --license cc-by-sa-4.0
  {PROG} export runs/3dseg8 --output export/ --checkpoint latest      a run that has not finished
  {PROG} export finetuned/ --output export/ --license mit --dataset "LiTS (CT)"   a save_pretrained folder
  {PROG} export resnet10.3dseg8 --format onnx --output onnx/                  ONNX, checked in onnxruntime
  {PROG} export runs/liver-ft --format monai-bundle --output bundle/ --license mit   a MONAI bundle

RUN is a co-training run folder (config.yaml, encoder.safetensors, metrics.jsonl, curves.png) or a
model folder (config.json + model.safetensors, as model.save_pretrained writes it; any head).
The export holds model.safetensors, config.json, README.md (model card), training_config.yaml,
metrics.jsonl, curves.png (those the run has) and, with --medicalnet-pth, resnet_DEPTH.pth.

--format onnx and --format monai-bundle also take name.tag, a fine-tuning run folder, or a weights
file with --model. onnx writes model.onnx (dynamic batch and spatial sizes) and model.json (the
preprocessing, class names, sha256 of the weights, opset, exporter, and the onnxruntime check);
monai-bundle writes configs/, models/model.pt, docs/README.md and LICENSE (see docs/deploying.md).
"""

PUBLISH_EPILOG = f"""\
examples:
  {PROG} publish runs/3dseg8 --repo-id org/med3d-resnet10-3dseg8 --tag 3dseg8-v2 --manifest weights.json
  {PROG} publish finetuned/ --repo-id org/liver-seg --tag lits-ft --manifest weights.json --license mit --private
  HF_ENDPOINT=https://hub.example.org HF_HUB_DISABLE_XET=1 {PROG} publish ...     a self-hosted Hub

Steps: check the weights (finite, strict load) and the tag; export; upload every file in one commit;
load the weights back by name.tag in a fresh process (empty caches, pinned commit, sha256 checked,
outputs equal); only then add the entry to the manifest, atomically. The token comes from HF_TOKEN or
`hf auth login` and is never printed or written.
"""


def _export_options() -> argparse.ArgumentParser:
    """What `export` and `publish` both take: the run and what goes into its files."""
    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("run", metavar="RUN", help="a co-training run folder, or a model folder (config.json + model.safetensors)")
    g = group.add_argument_group("what is exported")
    g.add_argument("--license", metavar="ID",
                   help="licence of the weights (mit, apache-2.0, cc-by-4.0, cc-by-sa-4.0, other, ...); "
                        "default: the licence all training datasets state in their dataset.json")
    g.add_argument("--checkpoint", metavar="latest|FILE",
                   help="export a training checkpoint instead of the run's encoder.safetensors")
    g.add_argument("--preprocess", metavar="JSON|FILE",
                   help="the preprocessing the weights expect (default: the run's, or the model folder's config.json)")
    g.add_argument("--dataset", action="append", metavar="NAME",
                   help="a training dataset, for the card and manifest (repeatable; default: the run's tasks)")
    g.add_argument("--description", metavar="TEXT", help="one line describing the weights")
    g.add_argument("--medicalnet-pth", action="store_true",
                   help="also write resnet_DEPTH.pth in MedicalNet's layout, for upstream code")
    return group


def _preprocess_argument(text: str | None) -> dict | None:
    """--preprocess: a JSON object, or a file holding one."""
    if text is None:
        return None
    path = Path(text).expanduser()
    try:
        raw = path.read_text(encoding="utf-8") if path.is_file() else text
        value = json.loads(raw)
    except OSError as err:
        raise UserError(f"--preprocess {text}: {err.strerror or err}") from None
    except ValueError:
        raise UserError(
            f"--preprocess {text!r}: expected a JSON object such as '{{\"intensity\": {{\"method\": \"hu_window\", "
            "\"min\": -200, \"max\": 250}}}}', or a file holding one"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"--preprocess {text!r}: expected a JSON object, got {type(value).__name__}")
    return value


# -- med3d export -----------------------------------------------------------------------------------


def add_export_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "export", common, _export_options(),
                    help="a trained run -> weights, config and model card, ready to upload (nothing is sent)",
                    description="Export a co-training run or a model folder: model.safetensors (zoo key layout), "
                                "config.json, a model card with Hub metadata, the training config and curves.",
                    epilog=EXPORT_EPILOG)
    p.add_argument("--output", "-o", required=True, help="a new (or empty) folder for the files")
    p.add_argument("--repo-id", metavar="ORG/NAME", help="the Hub repo, for the card's loading instructions only")
    p.add_argument("--tag", help="the weights tag, for the card's loading instructions only")
    d = p.add_argument_group("deploying (--format onnx | monai-bundle; needs med3d-hub[deploy])")
    d.add_argument("--format", choices=("hub", "onnx", "monai-bundle"), default="hub",
                   help="hub: the files of a Hub repo (default); onnx: model.onnx + model.json; monai-bundle: a MONAI bundle")
    d.add_argument("--returns", choices=("embedding", "layer4", "logits"),
                   help="what the ONNX model returns (default: the logits of a model with a head, else the embedding)")
    d.add_argument("--model", metavar="ARCH", help="the architecture of a weights file given as RUN (resnet10 ...)")
    d.add_argument("--opset", type=int, default=18, help="the ONNX opset (default 18)")
    d.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: PyTorch's dynamo-based exporter, the TorchScript-based one where it fails (default)")
    d.add_argument("--data", metavar="DIR", help="monai-bundle: the folder of NIfTI files its inference config reads")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "hub":
        return _cmd_deploy(args)
    from ..publishing.export import export
    from ..publishing.run import read_run

    run = read_run(args.run, checkpoint=args.checkpoint, preprocess=_preprocess_argument(args.preprocess),
                   datasets=args.dataset)
    name = f"{run.architecture}.{args.tag}" if args.tag else run.architecture
    exported = export(run, args.output, license=args.license, medicalnet_pth=args.medicalnet_pth,
                      repo_id=args.repo_id, tag=args.tag, description=args.description)
    say(args, f"{PROG} export: {name} from {run.kind} {run.path}" + (f" (step {run.step})" if run.step is not None else ""),
        f"  wrote {exported.folder}: {', '.join(exported.files)}",
        f"  model.safetensors: {exported.size:,} bytes, sha256 {exported.sha256}",
        f"  licence {exported.license}; nothing was uploaded (publish with `{PROG} publish`)")
    return EXIT_OK


def _cmd_deploy(args: argparse.Namespace) -> int:
    """--format onnx | monai-bundle: any model source -> a checked ONNX file, or a MONAI bundle."""
    from ..publishing.deployable import load_deployable

    found = load_deployable(args.run, model=args.model, checkpoint=args.checkpoint,
                            preprocess=_preprocess_argument(args.preprocess))
    if args.format == "onnx":
        from ..publishing.onnx_export import export_onnx

        done = export_onnx(found, args.output, returns=args.returns, opset=args.opset, exporter=args.exporter)
        check = done.sidecar["check"]
        say(args, f"{PROG} export: {found.architecture} from {found.source} -> {done.file} "
                  f"({done.sidecar['returns']}, opset {args.opset}, {done.sidecar['exporter']} exporter)",
            f"  checked in {check['runtime']} on {len(check['shapes'])} shapes: max relative error "
            f"{max(check['max_relative_error']):.1e} (tolerance {check['tolerance']:g})",
            f"  sidecar {done.folder / 'model.json'}: preprocessing, class names, weights sha256 {found.weights_sha256}")
        return EXIT_OK
    from ..publishing.monai_bundle import BUNDLE_FILES, export_bundle

    folder = export_bundle(found, args.output, license=args.license, data_dir=args.data)
    say(args, f"{PROG} export: {found.architecture} from {found.source} -> MONAI bundle {folder}",
        f"  wrote {', '.join(BUNDLE_FILES)}",
        f"  run it: python -m monai.bundle run --config_file {folder}/configs/inference.json "
        f"--meta_file {folder}/configs/metadata.json --bundle_root {folder}")
    return EXIT_OK


# -- med3d publish ----------------------------------------------------------------------------------


def add_publish_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "publish", common, _export_options(),
                    help="upload a trained run to a Hub, verify it loads back, add it to a manifest",
                    description="Publish weights: export, upload in one commit, prove in a fresh process that "
                                "name.tag loads back at the pinned commit with equal outputs, then add the entry "
                                "to the manifest. Any failure leaves the manifest unchanged.",
                    epilog=PUBLISH_EPILOG)
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repo (created if missing)")
    p.add_argument("--tag", required=True, help="the weights tag: the weights become ARCH.TAG, e.g. resnet50.3dseg8-v2")
    p.add_argument("--manifest", required=True, metavar="PATH", help="the weights manifest to add the entry to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing public repo is refused)")
    p.add_argument("--revision-message", metavar="TEXT", help="the commit message (default: 'Publish ARCH.TAG with med3d-hub')")
    p.add_argument("--force", action="store_true", help="replace an entry of the same name.tag in the manifest")
    p.add_argument("--default", action="store_true", help="make these the architecture's default weights in the manifest")
    p.add_argument("--verify-timeout", type=float, default=900.0, metavar="S",
                   help="seconds the round-trip process may take (default 900)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from ..publishing.publish import publish

    published = publish(
        args.run, repo_id=args.repo_id, tag=args.tag, manifest=args.manifest, private=args.private,
        revision_message=args.revision_message, force=args.force, default=args.default, license=args.license,
        preprocess=_preprocess_argument(args.preprocess), checkpoint=args.checkpoint, datasets=args.dataset,
        description=args.description, medicalnet_pth=args.medicalnet_pth, verify_timeout=args.verify_timeout,
        echo=lambda line: say(args, line),
    )
    say(args, f"published {published.name}: hf://{published.repo_id}@{published.revision}/{published.entry['filename']}",
        f"  load it with MED3D_HUB_MANIFEST={published.manifest} and "
        f"med3d_hub.create_model({published.name!r}, pretrained=True)")
    return EXIT_OK


# -- med3d compare ----------------------------------------------------------------------------------


def add_compare_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "compare", common, help="validation curves of several runs (PNG) and steps-to-target (table)",
                    description="Plot a validation metric against step and wall time for several runs and "
                                "report steps-to-target: the first validated step reaching TARGET x the best "
                                "final value. The last run is the baseline of the speed-up column.",
                    epilog=f"examples:\n  {PROG} compare runs/liver runs/liver-scratch\n"
                           f"  {PROG} compare runs/a runs/b --metric dice/Liver --target 0.95 -o liver.png")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.jsonl")
    p.add_argument("--metric", help="validation key (default: dice_mean, else accuracy)")
    p.add_argument("--target", type=float, default=0.9, help="fraction of the best final value (default 0.9)")
    p.add_argument("--label", action="append", metavar="NAME", help="a name per run, in order (default: folder names)")
    p.add_argument("--output", "-o", default="compare.png", help="the PNG to write (default compare.png)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..publishing.compare import as_json, compare_runs, format_table, plot_comparison

    metric, goal, curves = compare_runs(args.runs, metric=args.metric, target=args.target, labels=args.label)
    png = plot_comparison(metric, goal, curves, args.output)
    if args.json:
        print(as_json(metric, goal, curves))
    else:
        say(args, format_table(metric, goal, curves, args.target), "", f"curves: {png}")
    return EXIT_OK

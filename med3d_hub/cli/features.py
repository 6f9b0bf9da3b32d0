"""`med3d features` and `med3d fid`: embeddings of scans, and the scores of two sets of them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..errors import EXIT_FAILED, EXIT_OK
from ..weights.pretrained_cfg import has_weights
from .loading import apply_convention, command_preprocess, load_model
from .options import (
    DEFAULT_MODEL, UserError, add_channel_option, add_convention_option, add_inputs, add_model_command,
    add_progress_option, add_reading_options, check_inputs_exist, check_runtime, inputs_of, positive_int,
    preprocess_overrides, show_progress,
)
from .output import PROG, failed_inputs_code, report_skipped, say, warn

FEATURES_EPILOG = f"""\
examples:
  {PROG} features scans/*.nii.gz -o feats.npz                       default model and weights
  {PROG} features ct_series/ --model resnet50 --pretrained 3dseg8 -o feats.csv
  {PROG} features a.nii.gz b.nii.gz --maps -o maps.npy --size 56 224 224   layer4 maps
  {PROG} features --inputs-from list.txt --intensity hu_window:-200,250 -o feats.parquet
  {PROG} features scan.nii.gz --pretrained ~/weights/resnet_10.pth -o f.npy  a local MedicalNet file
  {PROG} features real/*.nii.gz --convention ha-gan -o real.npz          as HA-GAN computes its FID

inputs: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) files, DICOM folders
(each series, in sub-folders too, is a row: FOLDER#SeriesInstanceUID when there are several; --series UID
picks one), or 3-D .npy arrays. 4-D images: --channel N picks a volume. Several channels per case
(--channels a.nii.gz,b.nii.gz, a CSV with a column per channel, or --channel all) adapt the model's first
conv to that many. Rows follow the input order; an input that fails is reported on stderr and skipped
(exit code 1).
outputs: .npy (array), .npz (features + file names + provenance, for med3d fid), .csv / .parquet
(file column + f0..fC-1).
"""

FID_EPILOG = f"""\
examples:
  {PROG} fid real/ synthetic/ --model resnet50 --json scores.json      two folders of scans
  {PROG} fid real/*.nii.gz synthetic/*.nii.gz --model resnet50         files of two folders
  {PROG} features real/*.nii.gz -o real.npz ; {PROG} fid real.npz synth.npz   saved features, no network
  {PROG} fid real.npz synthetic/ --bootstrap 1000 --seed 0            a confidence interval
  {PROG} fid real/ synthetic/ --convention monai-generative            as a published convention computes it
  {PROG} fid --list-conventions                                        the conventions and their sources

Scores: FID (Frechet distance of the pooled layer4 features, float64), KID (unbiased polynomial-kernel
MMD^2, mean and std over subsets), unbiased MMD^2 with RBF and linear kernels. Every scan of a set
must be read: a failed scan is an error, not a smaller set. Every score carries a fingerprint: one
hash of what changes the number (weights, preprocessing, input size, layer, pooling, estimator, N).
"""

# -- med3d features ---------------------------------------------------------------------------------


def add_features_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_model_command(sub, common, "features",
                          help="embeddings or feature maps of scans, to .npy/.npz/.csv/.parquet",
                          description="Read scans, preprocess them as the weights expect, and write one embedding (or "
                                      "feature map) per scan.",
                          epilog=FEATURES_EPILOG)
    add_inputs(p)
    p.add_argument("--output", "-o", required=True, help="output file: .npy, .npz, .csv or .parquet")
    p.add_argument("--maps", nargs="?", const="layer4", default="pooled", choices=("pooled", "layer4", "stages"),
                   help="instead of pooled embeddings, write the layer4 map (--maps) or the layer1-4 maps "
                        "(--maps stages, .npz only)")
    add_reading_options(p, "volumes per forward; volumes of equal preprocessed shape are batched (default 1)")
    p.add_argument("--no-fast", action="store_true",
                   help="run the plain model instead of the BatchNorm-folded channels_last copy (same results)")
    add_progress_option(p)
    p.add_argument("--nan-policy", choices=("error", "zero"), default="error",
                   help="an input with NaN or infinite voxels fails (error, the default) or has them set to 0 (zero)")
    add_convention_option(p)
    p.set_defaults(func=cmd_features)


def cmd_features(args: argparse.Namespace) -> int:
    from ..inference.features import check_output, describe_preprocess, iter_features
    from ..weights.factory import resolve_pretrained

    apply_convention(args, DEFAULT_MODEL)
    preprocess_overrides(args)  # option errors first
    inputs = inputs_of(args)
    output = check_output(args.output, args.maps, [path for item in inputs for path in item.paths])
    resolve_pretrained(args.model, args.pretrained)  # option errors first, then the inputs, before any download
    check_runtime(args)
    check_inputs_exist(inputs)
    model, label = load_model(args, **_channels_of(inputs))
    preprocess = command_preprocess(model, args)
    say(args, f"{PROG} features: {len(inputs)} input(s), {args.model} with {label}, convention {args.convention}",
        f"  preprocessing: {describe_preprocess(preprocess)}")
    start = time.perf_counter()
    results, failures = [], []
    for result in iter_features(
        model, inputs, preprocess=preprocess, maps=args.maps, batch_size=args.batch_size, device=args.device,
        amp=args.amp, force_amp=args.force_amp, fast=not args.no_fast, workers=args.workers,
        progress=show_progress(args), nan_policy=args.nan_policy,
    ):
        if result.ok:
            results.append(result)
        else:
            failures.append(result)
            report_skipped(result.error)
    elapsed = time.perf_counter() - start
    if not results:
        print(f"{PROG}: error: all {len(inputs)} input(s) failed; nothing written to {output}", file=sys.stderr)
        return EXIT_FAILED
    shape = _write_features(args, output, results, model, preprocess)
    say(args, f"  wrote {output}: {shape} float32 from {len(results)} of {len(inputs)} input(s) in {elapsed:.1f} s")
    return failed_inputs_code(failures, len(inputs), f"have no row in {output}")


def _channels_of(inputs) -> dict:
    """``in_chans`` for the model when the inputs have several channels (the first one's count)."""
    from ..data.inputs import input_channels

    multi = next((item for item in inputs if len(item.paths) > 1 or item.channel == "all"), None)
    channels = input_channels(multi) if multi is not None else 1
    return {"in_chans": channels} if channels > 1 else {}


def _write_features(args: argparse.Namespace, output, results, model, preprocess):
    """Write the features of the inputs that were read (with their provenance when pooled); returns their shape."""
    from ..inference.features import save_features, stack_results

    features = stack_results(results, args.maps)
    provenance = None
    if args.maps == "pooled":
        from ..inference.feature_scores import feature_provenance

        provenance = feature_provenance(model, preprocess, volumes=len(results), feature_dim=features.shape[1],
                                        input_shapes=[r.shape for r in results], amp=args.amp,
                                        convention=args.convention)
    save_features(output, features, [r.name for r in results], provenance=provenance)
    return {k: v.shape for k, v in features.items()} if isinstance(features, dict) else features.shape


# -- med3d fid --------------------------------------------------------------------------------------


def add_fid_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_model_command(sub, common, "fid", help="FID, KID and MMD between two sets of scans or saved features",
                          description="Score a generative model: the Frechet distance (FID), KID and MMD between the "
                                      "Med3D features of two sets, with everything needed to compare the numbers "
                                      "(weights, sha256, layer, pooling, preprocessing, input size). Saved feature "
                                      "files made differently are refused. See docs/metrics.md.",
                          epilog=FID_EPILOG)
    p.add_argument("inputs", nargs="*", metavar="SET",
                   help="two folders of scans, two .npz files from `med3d features`, one of each, or real/*.nii.gz fake/*.nii.gz")
    p.add_argument("--json", metavar="FILE", help="write the scores and their provenance as JSON ('-': stdout)")
    p.add_argument("--bootstrap", type=positive_int, metavar="N", default=0, help="a 95%% bootstrap interval of the FID from N resamples")
    p.add_argument("--kid-subsets", type=positive_int, default=100, metavar="N", help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=positive_int, default=1000, metavar="N",
                   help="volumes per KID subset, capped at the smaller set (default 1000)")
    p.add_argument("--bandwidth", type=float, metavar="S", help="RBF bandwidth of the MMD (default: the median pairwise distance)")
    p.add_argument("--force", action="store_true", help="compare feature sets whose fingerprints differ")
    add_channel_option(p)
    add_convention_option(p)
    p.add_argument("--list-conventions", action="store_true",
                   help="list the published 3D FID conventions, what each computes and its source, and exit")
    add_reading_options(p, "volumes per forward (default 1)")
    p.set_defaults(func=cmd_fid)


def cmd_fid(args: argparse.Namespace) -> int:
    """FID, KID and MMD between two sets: saved features (.npz) or scans, with their provenance."""
    import shlex

    from ..inference.feature_scores import score_sets, summary_lines

    if args.list_conventions:
        return _list_conventions(args)
    apply_convention(args, DEFAULT_MODEL)
    if args.json and args.json != "-" and not Path(args.json).expanduser().parent.is_dir():
        raise UserError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise UserError(f"--bandwidth must be > 0, got {args.bandwidth}")
    report = score_sets(*_feature_sets(args), kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                        bandwidth=args.bandwidth, bootstrap=args.bootstrap, seed=args.seed, force=args.force)
    report["command"] = shlex.join([PROG, *getattr(args, "argv", [])])
    for note in report["warnings"]:
        warn(note)
    if args.json:
        _write_report(report, args.json)
    if args.json != "-":
        say(args, *summary_lines(report), *([f"wrote {args.json}"] if args.json else []))
    return EXIT_OK


def _list_conventions(args: argparse.Namespace) -> int:
    """--list-conventions: the table, for people (or as JSON with --json -)."""
    import dataclasses

    from ..inference.conventions import list_conventions

    conventions = list_conventions()
    if args.json:
        _write_report({"conventions": [dataclasses.asdict(c) for c in conventions]}, args.json)
        return EXIT_OK
    for c in conventions:
        model = c.model_name() if c.model else "--model (default " + DEFAULT_MODEL + ")"
        print(f"{c.name}: {c.title}\n  model    {model}; weights: {c.weights}\n"
              f"  computes {c.computes}\n  estimator {c.estimator}; layer {c.layer}, pooling {c.pooling}\n"
              f"  source   {c.source}" + (f"\n  choices  {c.choices}" if c.choices else "") + "\n")
    return EXIT_OK


def _feature_sets(args: argparse.Namespace) -> list:
    """Each set of the command line as features: read from a saved file, or extracted from its scans."""
    from ..data.inputs import expand_inputs
    from ..inference.feature_scores import expand_scans, features_of_scans, is_feature_file, read_feature_file, split_sets

    sets, model = [], None
    for group in split_sets(args.inputs):
        if is_feature_file(group):
            sets.append(read_feature_file(group[0]))
            made = (sets[-1].provenance or {}).get("convention", "med3d")
            if args.convention != "med3d" and made != args.convention:
                raise UserError(f"{group[0]} holds features of the {made} convention, not {args.convention}: "
                                f"recompute them with --convention {args.convention}, or leave --convention out")
            continue
        if model is None:  # the model is loaded once, and only when a set is scans
            check_runtime(args)
            import torch

            torch.manual_seed(args.seed)  # random weights (--pretrained none) are then the same on every run
            model, label = load_model(args)
            preprocess = command_preprocess(model, args)
            say(args, f"{PROG} fid: features of {args.model} with {label}, convention {args.convention}")
        scans = expand_inputs(expand_scans(group), channel=args.channel)
        source = group[0] if len(group) == 1 else f"{len(group)} scans in {os.path.dirname(group[0]) or '.'}"
        say(args, f"  {source}: {len(scans)} scan(s)")
        sets.append(features_of_scans(
            model, scans, preprocess, source=source, seed=None if has_weights(model) else args.seed,
            convention=args.convention,
            amp=args.amp, force_amp=args.force_amp, device=args.device, batch_size=args.batch_size, workers=args.workers,
            progress=(not args.quiet) and sys.stderr.isatty()))
    return sets


def _write_report(report: dict, destination: str) -> None:
    """--json: the report on stdout ('-') or in a file, written whole or not at all."""
    from ..files import atomic_write

    text = json.dumps(report, indent=2) + "\n"
    if destination == "-":
        print(text, end="")
    else:
        with atomic_write(Path(destination).expanduser(), "w") as handle:
            handle.write(text)

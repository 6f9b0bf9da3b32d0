"""The worked example of docs/metrics.md "Comparing with published numbers": the FID of the same two sets
of MNI152-derived scans under each published 3D FID convention, side by side.

1. **Scans.** As ``metrics_mni152.py``: nilearn's MNI152 T1 template (2 mm) drawn ``--n`` times with a
   random shift and intensity scale (the set ``real``), and a second draw blurred with a Gaussian of
   ``--blur`` voxels (the set ``blurred``). Written as NIfTI.
2. **Features and scores.** For every convention of ``med3d fid --list-conventions``, the commands a
   user runs: ``med3d features real/*.nii.gz --convention NAME -o real.npz`` (and ``blurred``), then
   ``med3d fid real.npz blurred.npz --json``. A convention whose weights, preprocessing and estimator
   are another's (medmetric and monai-generative-r50) gives the same fingerprint; it is computed once.

Weights: **random** (``--pretrained none --seed 0``; one seeded network per architecture), because the
Hub is not reachable where this was run: the numbers show how far apart the conventions' recipes put
the same two sets, not what Med3D's learned features say. With the weights available, ``--pretrained
default`` uses each convention's own. HA-GAN's input is 256^3 through a ResNet-50: on two CPU cores
that is about a minute per scan, so the default set size is small (``--n 3``).

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/fid_conventions_mni152.py --work /tmp/med3d-conventions

Writes ``benchmarks/results/fid_conventions_mni152.{json,md}`` (``--out``). Features already in
``--work`` (from an interrupted run with the same options) are reused; ``--only`` runs some conventions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python benchmarks/fid_conventions_mni152.py` from a clone
    sys.path.insert(0, str(HERE.parent))

from benchmarks.metrics_mni152 import corrupt, draw, template, write_set  # noqa: E402
from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.inference.conventions import list_conventions  # noqa: E402


def same_computation(conv) -> str:
    """Everything of a convention that changes its number (what the fingerprint hashes, less the weights' bytes)."""
    return json.dumps([conv.model, conv.pretrained, conv.preprocess, conv.layer, conv.pooling, conv.estimator],
                      sort_keys=True)


def med3d(*argv: str) -> None:
    code = cli.main(list(argv))
    if code != 0:
        raise SystemExit(f"med3d {' '.join(argv)} exited with {code}")


def table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/metrics.md."""
    lines = ["| convention | weights | network input | features | FID estimator | FID | KID | fingerprint |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['convention']} | {r['model']} | {r['input']} | {r['feature_dim']} | {r['estimator']} | "
              f"{r['fid']:.4g} | {r['kid']:.3g} | `{r['fingerprint']}` |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/med3d-conventions"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--n", type=int, default=3, help="scans per set (default 3)")
    parser.add_argument("--blur", type=float, default=2.0, help="Gaussian sigma of the second set, voxels (default 2)")
    parser.add_argument("--pretrained", default="none", help="'none' (random weights, the default) or 'default'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these conventions only (default: all)")
    parser.add_argument("--ha-gan-size", type=int, default=256,
                        help="HA-GAN's network input edge; its recipe is 256 (smaller: a cheaper, labelled variant)")
    args = parser.parse_args()
    start = time.perf_counter()

    brain, affine = template()
    rng = np.random.default_rng(args.seed)
    real = draw(brain, args.n, rng)
    blurred = [corrupt(v, "blur", args.blur, rng) for v in draw(brain, args.n, rng)]
    scans = {label: sorted(str(p) for p in (args.work / "scans" / label).glob("*.nii.gz"))
             for label in ("real", "blurred")}
    if [len(paths) for paths in scans.values()] != [args.n, args.n]:  # else the scans of an earlier run, reused
        scans = {"real": write_set(args.work / "scans" / "real", real, affine),
                 "blurred": write_set(args.work / "scans" / "blurred", blurred, affine)}

    rows: list[dict] = []
    done: dict[str, dict] = {}
    weights = [] if args.pretrained == "default" else ["--pretrained", args.pretrained, "--seed", str(args.seed)]
    for conv in list_conventions():
        if args.only and conv.name not in args.only:
            continue
        key = same_computation(conv)
        if key in done:
            rows.append({**done[key], "convention": conv.name, "same_as": done[key]["convention"]})
            print(f"{conv.name:<22} the same computation as {done[key]['convention']}", flush=True)
            continue
        begin = time.perf_counter()
        variant = ["--size", str(args.ha_gan_size)] if conv.name == "ha-gan" and args.ha_gan_size != 256 else []
        files = {}
        for label, paths in scans.items():
            files[label] = args.work / conv.name / f"{label}.npz"
            files[label].parent.mkdir(parents=True, exist_ok=True)
            if files[label].exists():  # made by an earlier run of the same command
                continue
            med3d("features", *paths, "--convention", conv.name, *weights, *variant, "--device", "cpu", "-q",
                  "-o", str(files[label]))
        out = args.work / conv.name / "score.json"
        if not (out.exists() and all(out.stat().st_mtime > f.stat().st_mtime for f in files.values())):
            med3d("fid", str(files["real"]), str(files["blurred"]), "--json", str(out), "--seed", str(args.seed), "-q")
        report = json.loads(out.read_text())
        provenance = report["provenance"]
        shapes = sorted({tuple(s) for s in report["sets"][0]["input_shapes"]})
        row = {
            "convention": conv.name, "model": provenance["model"], "weights": provenance["weights"],
            "input": " x ".join(map(str, shapes[0])) + (" (as read)" if not provenance["input_size"] else ""),
            "feature_dim": provenance["feature_dim"], "estimator": report["fid_estimator"], "fid": report["fid"],
            "kid": report["kid"]["mean"], "mmd2_rbf": report["mmd2_rbf"]["value"],
            "fingerprint": report["fingerprint"],
            "commands": [" ".join(["med3d features real/*.nii.gz --convention", conv.name, *weights, *variant, "-o real.npz"]),
                         " ".join(["med3d features blurred/*.nii.gz --convention", conv.name, *weights, *variant,
                                   "-o blurred.npz"]),
                         "med3d fid real.npz blurred.npz --json score.json"],
        }
        done[key] = row
        rows.append(row)
        print(f"{conv.name:<22} FID {row['fid']:.4g}  KID {row['kid']:.3g}  ({row['input']}, {row['feature_dim']}-d, "
              f"{row['estimator']}; {time.perf_counter() - begin:.1f} s)", flush=True)

    result = {"volumes_per_set": args.n, "blur_sigma_voxels": args.blur, "weights": args.pretrained,
              "ha_gan_size": args.ha_gan_size,
              "seed": args.seed, "rows": rows}
    if args.only:
        print(table(rows), end="")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fid_conventions_mni152.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fid_conventions_mni152.md").write_text(table(rows))
    print(table(rows), end="")
    print(f"{time.perf_counter() - start:.1f} s (features of an earlier run reused), {args.n} scans per set")


if __name__ == "__main__":
    main()

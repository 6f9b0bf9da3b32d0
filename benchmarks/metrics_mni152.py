"""The worked example of docs/metrics.md: FID, KID and MMD between scans derived from the MNI152
template and copies corrupted by noise or blur at increasing strength.

1. **Scans.** nilearn's MNI152 T1 template (2 mm) is drawn ``--n`` times with a random shift of up
   to 4 voxels per axis and a random intensity scale (0.9-1.1): the set ``real``. A second,
   independent draw is ``clean``, the reference at strength 0 (what two samples of one distribution
   score). Copies of ``clean`` get Gaussian noise inside the head (sigma = strength x the head's
   intensity std) or a Gaussian blur (sigma in voxels). All are written as NIfTI files.
2. **Features.** Each set goes through ``med3d_hub.inference.feature_scores.features_of_scans`` (the
   ``med3d features`` path) and is saved as ``.npz`` with its provenance.
3. **Scores.** ``med3d fid real.npz SET.npz --json ... --bandwidth S --seed 0`` for every set, with
   the RBF bandwidth fixed to the median heuristic of ``real`` vs ``clean`` so that the MMD values
   are comparable across rows.

Weights: by default a ResNet-10 with **random weights** (``torch.manual_seed(0)``), because the Hub
is not reachable where this example was made; the numbers show the method, not Med3D's features.
With the pretrained weights (needs the Hub, a mirror, or ``med3d download resnet10`` beforehand):

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/metrics_mni152.py --pretrained 23datasets --work /tmp/med3d-metrics

Writes ``benchmarks/results/metrics_mni152.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from med3d_hub.cli import app as cli
from med3d_hub.cli.loading import model_preprocess
from med3d_hub.inference.feature_scores import features_of_scans
from med3d_hub.inference.features import save_features
from med3d_hub.weights.factory import create_model

HERE = Path(__file__).resolve().parent
NOISE = (0.05, 0.1, 0.2, 0.4)  # x the head's intensity std
BLUR = (0.5, 1.0, 2.0, 3.0)  # Gaussian sigma, voxels of 2 mm


def template() -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=2)
    return np.asarray(image.dataobj, dtype=np.float32) * 255, image.affine.copy()


def draw(brain: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n copies, each shifted by up to 4 voxels per axis and scaled by 0.9-1.1."""
    return [np.roll(brain, tuple(rng.integers(-4, 5, 3)), axis=(0, 1, 2)) * rng.uniform(0.9, 1.1) for _ in range(n)]


def corrupt(volume: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    import scipy.ndimage as ndi

    head = volume > 0
    if kind == "noise":
        noisy = volume + rng.normal(0.0, strength * volume[head].std(), volume.shape).astype(np.float32)
        return np.where(head, noisy, 0).astype(np.float32)  # the background stays 0: the same foreground crop
    return np.where(head, ndi.gaussian_filter(volume, strength), 0).astype(np.float32)


def write_set(folder: Path, volumes: list[np.ndarray], affine: np.ndarray) -> list[str]:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, volume in enumerate(volumes):
        path = folder / f"scan{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
        paths.append(str(path))
    return paths


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, as docs/metrics.md shows them."""
    lines = ["| corruption | strength | FID | KID (mean +- std) | MMD^2 (RBF) |", "|---|---|---|---|---|"]
    lines += [f"| {r['corruption']} | {r['strength']:g} | {r['fid']:.4g} | {r['kid']:.4g} +- {r['kid_std']:.2g} | "
              f"{r['mmd2_rbf']:.4g} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/med3d-metrics"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--n", type=int, default=16, help="scans per set (default 16)")
    parser.add_argument("--size", type=int, nargs=3, default=(48, 64, 64), help="network input D H W (default 48 64 64)")
    parser.add_argument("--pretrained", default=None, help="a resnet10 weights tag (e.g. 23datasets); default: random weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()

    brain, affine = template()
    rng = np.random.default_rng(args.seed)
    real, clean = draw(brain, args.n, rng), draw(brain, args.n, rng)
    sets = {("clean", 0.0): clean}
    for kind, strengths in (("noise", NOISE), ("blur", BLUR)):
        for s in strengths:
            sets[(kind, s)] = [corrupt(v, kind, s, rng) for v in clean]

    torch.manual_seed(args.seed)
    name = f"resnet10.{args.pretrained}" if args.pretrained else "resnet10"
    model = create_model(name, pretrained=bool(args.pretrained), num_classes=0)
    preprocess = model_preprocess(model, "resnet10", {"size": tuple(args.size)})
    seed = None if args.pretrained else args.seed

    def features(label: str, volumes: list[np.ndarray]) -> Path:
        scans = write_set(args.work / "scans" / label, volumes, affine)
        fs = features_of_scans(model, scans, preprocess, source=label, seed=seed)
        return save_features(args.work / f"{label}.npz", fs.features, fs.names, fs.provenance)

    reference = features("real", real)
    files = {key: features(f"{key[0]}-{key[1]:g}", volumes) for key, volumes in sets.items()}

    from med3d_hub.inference import metrics
    from med3d_hub.inference.features import load_features

    bandwidth = metrics.median_bandwidth(load_features(reference).features, load_features(files[("clean", 0.0)]).features)
    rows, command = [], None
    for (kind, strength), path in files.items():
        out = args.work / f"scores-{path.stem}.json"
        argv = ["fid", str(reference), str(path), "--json", str(out), "--seed", str(args.seed),
                "--bandwidth", repr(bandwidth), "-q"]
        code = cli.main(argv)
        if code != 0:
            raise SystemExit(f"med3d {' '.join(argv)} exited with {code}")
        report = json.loads(out.read_text())
        command = command or report["command"]
        rows.append({"corruption": kind, "strength": strength, "fid": report["fid"], "kid": report["kid"]["mean"],
                     "kid_std": report["kid"]["std"], "mmd2_rbf": report["mmd2_rbf"]["value"]})
        print(f"{kind:<6} {strength:>5g}  FID {report['fid']:.4g}  KID {report['kid']['mean']:.4g} "
              f"+- {report['kid']['std']:.2g}  MMD2 {report['mmd2_rbf']['value']:.4g}", flush=True)

    result = {
        "weights": report["provenance"]["weights"], "provenance": report["provenance"], "volumes_per_set": args.n,
        "bandwidth": bandwidth, "example_command": command, "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics_mni152.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "metrics_mni152.md").write_text(table(rows))
    print(table(rows), end="")
    print(f"{result['seconds']} s; weights: {result['weights']}")


if __name__ == "__main__":
    main()

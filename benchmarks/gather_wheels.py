"""Gather what the GPU machine lacks for the device check into ``.device-check/`` (git-ignored).

    python -m benchmarks.gather_wheels            # then: see docs/performance.md, GPU

The GPU machine has python3 with torch, numpy, huggingface_hub, safetensors, timm, PyYAML, scipy,
matplotlib, tensorboard and tqdm, but no MONAI or nibabel, and no network. This downloads their
pure-Python wheels, pinned (``--no-deps``: their own needs, numpy, packaging and
typing-extensions, are there), and copies nilearn's MNI152 T1 template as the real scan of the
features step. ``benchmarks/device_check.sh`` installs the wheels into a folder under /tmp.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Pure-Python wheels the check needs, at the versions CI tests (both run on torch 2.11 / numpy 2.5:
# MONAI 1.6.1 needs torch >= 2.8 and numpy < 3).
WHEELS = ("monai==1.6.1", "nibabel==5.4.2")
PYTHON_VERSION = "3.12"  # the GPU machine's python3
LIMIT_BYTES = 32 * 2**20  # the whole carried tree must stay under 64 MiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gather_wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(ROOT / ".device-check"), help="folder to fill (default .device-check)")
    p.add_argument("--scan", help="the NIfTI scan to carry (default: nilearn's MNI152 T1 template)")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    wheels = dest / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)  # one version of each: two would stop the install
    wheels.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON_VERSION, "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *WHEELS], check=True)
    scan = args.scan
    if scan is None:
        from benchmarks.device_check import nilearn_mni152

        scan = nilearn_mni152()
        if scan is None:
            raise SystemExit("nilearn is not installed: pip install nilearn, or pass --scan FILE.nii.gz")
    shutil.copyfile(scan, dest / "mni152_t1.nii.gz")
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    for f in sorted(dest.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}  {f.stat().st_size / 2**20:.1f} MiB")
    print(f"{total / 2**20:.1f} MiB in {dest}")
    if total > LIMIT_BYTES:
        raise SystemExit(f"{dest} holds {total / 2**20:.0f} MiB; keep it under {LIMIT_BYTES // 2**20} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

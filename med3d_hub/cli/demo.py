"""`med3d demo`: a real scan in, features and a picture out (the work is in ``inference/demo.py``)."""

from __future__ import annotations

import argparse

from ..errors import EXIT_OK
from ..weights.pretrained_cfg import has_weights
from .loading import load_model, model_preprocess
from .options import add_model_command, check_inputs_exist, check_runtime, preprocess_overrides
from .output import PROG

DEMO_EPILOG = f"""\
examples:
  {PROG} demo                                     MNI152 T1 (and the InVesalius head CT if installed)
  {PROG} demo --model resnet50 --out-dir pics
  {PROG} demo --pretrained ~/weights/resnet_10.pth  weights from a local file, no network
  {PROG} demo --scan my_scan.nii.gz --size 56 224 224
  {PROG} demo --pretrained none                   random weights (to try the pipeline offline)
"""


def add_demo_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_model_command(sub, common, "demo", help="a real scan -> features + a picture",
                          description="Run a Med3D model on real scans shipped by installed packages (nilearn's "
                                      "MNI152 T1 template; the InVesalius head CT of Debian's invesalius-examples "
                                      "when installed), print what was done, and save a picture of each scan's "
                                      "mid-planes beside the layer4 activation map.",
                          epilog=DEMO_EPILOG)
    p.add_argument("--scan", action="append", metavar="SCAN",
                   help="mni, ct, or a path (NIfTI, DICOM folder, .npy, .inv3); repeatable (default: mni and ct)")
    p.add_argument("--out-dir", default="med3d_demo", help="where the pictures and embeddings go (default med3d_demo)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..inference.demo import DEFAULT_SCANS, run_demo
    from ..networks.registry import split_name
    from ..weights.factory import resolve_pretrained

    overrides = preprocess_overrides(args)
    resolve_pretrained(args.model, args.pretrained)  # option errors first, then the scans, before any download
    check_runtime(args)
    paths = [scan for scan in args.scan or () if scan not in DEFAULT_SCANS]
    if paths:
        check_inputs_exist(paths)
    model, label = load_model(args)
    run_demo(
        model,
        weights=label,
        random_weights=not has_weights(model),
        model_name=split_name(args.model)[0],
        scans=args.scan or None,
        out_dir=args.out_dir,
        preprocess=model_preprocess(model, args.model, overrides),
        device=args.device,
        amp=args.amp,
        force_amp=args.force_amp,
        echo=(lambda *_: None) if args.quiet else (lambda line: print(line, flush=True)),
    )
    return EXIT_OK

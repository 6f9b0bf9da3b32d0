"""`med3d preview`: a picture of exactly what the network receives for a scan (the work is in ``inference/demo.py``)."""

from __future__ import annotations

import argparse

from ..errors import EXIT_OK
from .loading import apply_convention, preprocess_of
from .options import (
    DEFAULT_MODEL, UserError, add_command, add_convention_option, check_inputs_exist, common_options, model_options,
    preprocess_options,
)
from .output import PROG, say

PREVIEW_EPILOG = f"""\
examples:
  {PROG} preview scan.nii.gz -o preview.png                         the default model's preprocessing
  {PROG} preview ct_series/ --model resnet50.23datasets -o ct.png    a DICOM series folder
  {PROG} preview scan.nii.gz --convention ha-gan -o ha-gan.png      what HA-GAN's FID feeds resnet50

The picture: the three mid-planes of the preprocessed (1, 1, D, H, W) tensor, its shape, voxel size,
intensity range and recipe in the title. Nothing is downloaded unless --pretrained names a file or hf://.
"""


def add_preview_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "preview", common, model_options(DEFAULT_MODEL), preprocess_options(),
                    help="a picture of the exact tensor the network receives for a scan",
                    description="Read a scan (NIfTI, DICOM series folder, .npy, ...), preprocess it as --model, "
                                "--pretrained or --convention says, and draw the three mid-planes of the network "
                                "input with its shape, spacing, intensity range and recipe.",
                    epilog=PREVIEW_EPILOG)
    p.add_argument("scan", metavar="SCAN", help="a NIfTI file, a DICOM series folder or a 3-D .npy array")
    p.add_argument("--output", "-o", required=True, help="the picture to write (.png)")
    add_convention_option(p)
    p.set_defaults(func=cmd_preview)


def cmd_preview(args: argparse.Namespace) -> int:
    from ..inference.demo import preview_scan

    if not args.output.lower().endswith(".png"):
        raise UserError(f"--output {args.output}: the preview is a PNG; give a name ending in .png")
    apply_convention(args, DEFAULT_MODEL)
    check_inputs_exist([args.scan])
    preprocess = preprocess_of(args)
    recipe = f"convention {args.convention}" if args.convention != "med3d" else f"{args.model} weights' recipe"
    picture = preview_scan(args.scan, preprocess, args.output, recipe)
    say(args, f"{PROG} preview: wrote {picture}")
    return EXIT_OK

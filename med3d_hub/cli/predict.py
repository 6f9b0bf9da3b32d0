"""`med3d predict`: a fine-tuned or published model applied to new scans (the work is in ``inference/predict.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    UserError, add_command, add_inputs, add_progress_option, add_reading_options, add_resume_option, check_runtime,
    inputs_of, positive_int, process_group, runtime_options, show_progress,
)
from .output import PROG, failed_inputs_code, report_skipped, say

PREDICT_EPILOG = f"""examples:
  {PROG} predict runs/liver-ft ct/*.nii.gz dicom_dir/ -o masks/         one mask per scan (NIfTI, the scan's grid)
  {PROG} predict resnet10.lits-ft ct/*.nii.gz -o masks/ --probabilities  weights published with their head
  {PROG} predict runs/nodule-cls scans/*.nii.gz -o predictions.csv      class probabilities, one row per scan
  {PROG} predict weights.safetensors scan.nii.gz --model resnet10 -o masks/   a weights file: the inputs before --model
  {PROG} predict runs/brain-ft --channels a_t1.nii.gz,a_t2.nii.gz -o masks/   a model of two input channels

A segmentation writes SCAN.nii.gz (uint8 labels, the input's shape and affine), SCAN.json (the label
names) and, with --probabilities, SCAN_probabilities.npz (float16 maps). Each series of a DICOM folder of several
writes FOLDER_UID.nii.gz; a case of several channel files is named after its first file. Exit code 1: some inputs failed
(the others were written); 2: a usage error."""


def add_predict_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "predict", common, runtime_options(),
                    help="apply a fine-tuned or published model: masks in each scan's grid, or class probabilities",
                    description="Apply a fine-tuned model (a finetune run folder, an export folder, name.tag, or a "
                                "weights file with --model) to new scans, with the preprocessing stored with the "
                                "weights. Segmentation: sliding windows over the whole scan, the mask written on "
                                "the scan's own grid. Classification: one row of class probabilities per scan.",
                    epilog=PREDICT_EPILOG)
    p.add_argument("source", help="a finetune run folder, a model folder, name.tag, or a weights file (with --model)")
    add_inputs(p)
    p.add_argument("--output", "-o", required=True,
                   help="segmentation: a folder for the masks (created when missing); classification: a .csv or .parquet file")
    p.add_argument("--model", "-m", help="the architecture of a weights file, e.g. resnet10")
    p.add_argument("--batch-size", "-b", type=positive_int, default=1,
                   help="windows per forward (segmentation) or scans per forward (classification); default 1")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of the sliding windows, in [0, 1) (default 0.25)")
    p.add_argument("--window", nargs=3, type=positive_int, metavar=("D", "H", "W"),
                   help="sliding window size (default: the training crop)")
    p.add_argument("--probabilities", action="store_true", help="also write float16 per-class maps (segmentation)")
    p.add_argument("--no-fast", action="store_true", help="run the plain model instead of the BatchNorm-folded copy")
    add_reading_options(p)
    add_resume_option(p, "whose mask (and sidecar, and probabilities when asked for) is already written")
    add_progress_option(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..inference.cohort import predict_masks
    from ..inference.predict import check_table_output, load_predictor, mask_path, write_mask, write_table

    inputs = inputs_of(args)
    check_runtime(args)
    output = Path(args.output)
    with process_group(args) as dist:
        predictor = load_predictor(args.source, model=args.model, window=args.window)
        if predictor.task == "cls":
            check_table_output(output)
            if args.resume:
                raise UserError("--resume skips the masks a segmentation already wrote; a classification table is "
                                "written whole at the end: rerun without --resume")
            paths = [output] * len(inputs)
        else:
            if output.exists() and not output.is_dir():
                raise UserError(f"--output {output} is a file: a segmentation writes one mask per scan into a folder; "
                                "give a folder (it is created when missing)")
            paths = [mask_path(item.name, output, item.kind) for item in inputs]
            twice = sorted({str(n) for n in paths if paths.count(n) > 1})
            if twice:
                raise UserError(f"several inputs would write the same mask ({', '.join(twice)}); rename or predict them apart")
            make_output_folder(output)
        ranks = f" on {dist.world_size} ranks" if dist.world_size > 1 else ""
        say(args, f"{PROG} predict: {len(inputs)} input(s){ranks}, {args.source}: {predictor.describe()}")
        rows, failures, done = [], [], 0
        for i, result in predict_masks(predictor, inputs, paths, resume=args.resume, probabilities=args.probabilities,
                                       dist=dist, batch_size=args.batch_size, overlap=args.overlap,
                                       device=dist.device if dist.initialised else args.device, amp=args.amp,
                                       force_amp=args.force_amp, fast=not args.no_fast, progress=show_progress(args),
                                       workers=args.workers, nan_policy=args.nan_policy):
            done += 1
            if not result.ok:
                failures.append(result.name)
                report_skipped(result.error)
            elif predictor.task == "seg":
                written = write_mask(result, paths[i], probabilities=args.probabilities, source=str(args.source))
                say(args, f"  wrote {written[0]}")
            else:
                rows.append((i, result))
        dist.barrier()
        failures = [name for rank in dist.all_gather_object(failures) for name in rank]
        done = sum(dist.all_gather_object(done))
        if predictor.task == "cls":
            rows = sorted((row for rank in dist.all_gather_object(rows) for row in rank), key=lambda row: row[0])
            if rows and dist.is_main:
                write_table([r for _, r in rows], output)
                say(args, f"  wrote {output}: {len(rows)} row(s)")
        elif args.resume:
            say(args, f"  {len(inputs) - done} mask(s) already written were kept")
    return failed_inputs_code(failures, len(inputs), "were not written")


def make_output_folder(folder: Path) -> None:
    """The masks' folder, created with its parents as nnU-Net's and MONAI's writers do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {folder}: cannot create the folder ({err.strerror or err}); "
                        "choose a folder you may write to") from None

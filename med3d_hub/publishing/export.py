"""Turn a finished run into files ready to upload: weights, config, model card, training record.

    run = read_run("runs/3dseg8-r50")
    export(run, "export/", license="cc-by-sa-4.0")          # `med3d export RUN --output DIR`

Nothing here touches the network; ``med3d_hub.publishing.publish`` uploads what this module writes.

What a run is, and how it is read: ``run.py``.

What an export holds (``EXPORT_FILES`` describes each file): ``model.safetensors``,
``config.json``, ``README.md`` (the model card), ``training_config.yaml`` (local paths reduced to
folder names), ``metrics.jsonl``, ``curves.png`` and, on request, ``resnet_{depth}.pth`` in
MedicalNet's layout for upstream code.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_folder, sha256_file
from ..weights import model_files
from ..weights.checkpoints import HEAD_PREFIXES
from .card import EXPORT_FILES
from .run import Run, RunError, license_id

__all__ = ["EXPORT_FILES", "Exported", "default_description", "export"]


@dataclass(frozen=True)
class Exported:
    """An export folder and what the manifest needs to know about it."""

    folder: Path
    files: tuple[str, ...]
    sha256: str  # of model.safetensors
    size: int
    license: str
    description: str


def default_description(run: Run) -> str:
    depth = run.architecture.removeprefix("resnet")
    if run.kind == "co-training run":
        names = ", ".join(d.name for d in run.datasets)
        step = f", {run.step} steps" if run.step else ""
        return f"Med3D ResNet-{depth} encoder co-trained on {len(run.datasets)} dataset(s) ({names}) with med3d-hub{step}"
    head = {None: "encoder (no head)"}.get(run.head, f"with its head ({run.head})")
    chans = f", {run.config['in_chans']} input channels" if run.config.get("in_chans", 1) != 1 else ""
    return f"Med3D ResNet-{depth} {head}{chans}"


def export(
    run: Run,
    output: str | os.PathLike,
    *,
    license: str | None = None,
    medicalnet_pth: bool = False,
    repo_id: str | None = None,
    tag: str | None = None,
    description: str | None = None,
) -> Exported:
    """Write the files of ``run`` into the new (or empty) folder ``output``; nothing is sent anywhere.

    The files are written into a temporary folder beside ``output`` and moved into place at the
    end, so an interrupted export leaves no half-filled ``output``. ``license`` is required unless
    every training dataset states the same licence in its dataset.json. ``repo_id`` and ``tag``
    only fill in the model card's loading instructions.
    """
    from .card import model_card

    if license is None and run.license is None:
        found = sorted({d.licence for d in run.datasets if d.licence})
        hint = f" (the datasets state: {', '.join(found)})" if found else ""
        raise RunError(
            "give the licence of the weights (--license): an id such as mit, apache-2.0, cc-by-4.0, "
            f"cc-by-sa-4.0, or other{hint}; the Medical Segmentation Decathlon data is CC-BY-SA 4.0"
        )
    if medicalnet_pth and not run.config.get("dilated", True):
        raise RunError(
            "--medicalnet-pth needs a dilated model: MedicalNet's own network always dilates layer3/layer4 "
            "(output stride 8), and this one was trained with dilated=False (output stride 32), so upstream code "
            "would compute another function with these weights. Export without --medicalnet-pth; "
            "med3d_hub.create_model(..., dilated=False) loads the safetensors file"
        )
    license = license_id(license or run.license)
    description = description or default_description(run)
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RunError(f"{output} exists and is not an empty folder; export into a new folder")
    with atomic_folder(output) as tmp:
        files = _write_files(run, tmp, medicalnet_pth)
        weights = tmp / model_files.WEIGHTS_NAME
        sha256 = sha256_file(weights)
        size = weights.stat().st_size
        card = model_card(run, files=files, license=license, description=description, repo_id=repo_id, tag=tag,
                          sha256=sha256)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files = ["README.md", *files]
    return Exported(output, tuple(files), sha256, size, license, description)


def _write_files(run: Run, folder: Path, medicalnet_pth: bool) -> list[str]:
    model_files.write_model_files(folder, run.model, preprocess=run.preprocess, class_names=run.config.get("class_names"))
    files = [model_files.WEIGHTS_NAME, model_files.CONFIG_NAME]
    if run.training is not None:
        import yaml

        (folder / "training_config.yaml").write_text(yaml.safe_dump(run.training, sort_keys=False), encoding="utf-8")
        files.append("training_config.yaml")
    for name, source in run.extra_files.items():
        shutil.copyfile(source, folder / name)
        files.append(name)
    if medicalnet_pth:
        name = f"resnet_{run.architecture.removeprefix('resnet')}.pth"
        backbone = {k: v for k, v in model_files.file_state_dict(run.model.state_dict()).items()
                    if not k.startswith(HEAD_PREFIXES)}
        torch.save({"state_dict": {f"module.{k}": v for k, v in backbone.items()}}, folder / name)
        files.append(name)
    return files

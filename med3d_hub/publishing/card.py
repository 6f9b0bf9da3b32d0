"""The model card (``README.md``) of exported weights: Hub metadata in YAML, then prose.

The YAML block carries ``license``, ``library_name``, ``tags``, ``datasets``, ``pipeline_tag`` and
a ``model-index`` with the validation Dice of each training dataset (from the run's
``metrics.jsonl``); huggingface_hub's ``ModelCardData`` writes it, so the Hub reads it as its own.
The prose says what the weights are, how to load them, the training recipe and data, the
preprocessing they expect, intended use, limitations and how to cite the paper.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..weights import model_files

if TYPE_CHECKING:
    from .run import Run

__all__ = ["CITATION", "EXPORT_FILES", "PAPER", "model_card"]

EXPORT_FILES = {
    model_files.WEIGHTS_NAME: "the weights, zoo key layout (safetensors)",
    model_files.CONFIG_NAME: "the network's settings and preprocessing; `Med3DResNet.from_pretrained` reads it",
    "README.md": "this model card",
    "training_config.yaml": "the training configuration (local paths reduced to folder names)",
    "metrics.jsonl": "training and validation metrics, one JSON record per line",
    "curves.png": "training loss and validation Dice curves",
}

PAPER = "Chen S, Ma K, Zheng Y. Med3D: Transfer Learning for 3D Medical Image Analysis. arXiv:1904.00625, 2019"
CITATION = """@article{chen2019med3d,
  title   = {Med3D: Transfer Learning for 3D Medical Image Analysis},
  author  = {Chen, Sihong and Ma, Kai and Zheng, Yefeng},
  journal = {arXiv preprint arXiv:1904.00625},
  year    = {2019}
}"""


def _pipeline_tag(run: Run) -> str:
    if run.config.get("seg_classes"):
        return "image-segmentation"
    if run.config.get("num_classes"):
        return "image-classification"
    return "image-feature-extraction"


def card_metadata(run: Run, *, license: str, name: str):
    """huggingface_hub ``ModelCardData`` of the card's YAML block."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    if run.validation is not None:
        by_name = {d.name: d for d in run.datasets}
        for task, value in sorted(run.validation.dice.items()):
            info = by_name.get(task)
            folder = info.folder if info and info.folder else task
            results.append(EvalResult(
                task_type="image-segmentation",
                task_name="3D segmentation (co-training decoder branch)",
                dataset_type=folder.lower(),
                dataset_name=info.describe() if info else task,
                dataset_split="validation",
                metric_type="dice",
                metric_value=round(value, 4),
                metric_name=f"Validation Dice at step {run.validation.step} (mean over foreground classes)",
            ))  # fmt: skip
    modalities = {(d.modality or "").lower() for d in run.datasets}
    tags = ["medical-imaging", "3d", "med3d", "resnet", "pytorch", "safetensors"]
    tags += [m for m in ("ct", "mri") if m in modalities]
    return ModelCardData(
        license=license,
        library_name="med3d-hub",
        tags=tags,
        datasets=[d.folder or d.name for d in run.datasets] or None,
        pipeline_tag=_pipeline_tag(run),
        model_name=name,
        eval_results=results or None,
    )


def _layout(config: dict) -> str:
    """layer3/layer4 as the config builds them: Med3D's dilated layout, or the strided one."""
    if config.get("dilated", True):
        return f"dilated layer3/layer4, output stride {config.get('output_stride', 8)}"
    return f"strided layer3/layer4 (dilated=False), output stride {config.get('output_stride', 32)}"


def model_card(
    run: Run,
    *,
    files: list[str],
    license: str,
    description: str,
    repo_id: str | None = None,
    tag: str | None = None,
    sha256: str | None = None,
) -> str:
    """The text of README.md: Hub metadata, then one section after another."""
    arch = run.architecture
    name = f"{arch}.{tag}" if tag else arch
    meta = card_metadata(run, license=license, name=name).to_yaml()
    out = [f"---\n{meta}\n---\n", f"# {name}\n", f"{description}.\n"]
    out.append(
        f"A Med3D 3D ResNet-{arch.removeprefix('resnet')} (Chen, Ma, Zheng 2019) for CT and MRI volumes, in the layout of "
        f"med3d-hub's model zoo: MedicalNet's parameter names, {_layout(run.config)}. "
        "The weights load strictly; a mismatch is an error that names the keys.\n"
    )
    out += _usage(run, name, repo_id or "ORG/NAME")
    out += _model_section(run, sha256)
    out += _preprocessing_section(run)
    out += _training_data_results(run, files)
    out += _use_and_limits(run)
    out.append("## Files\n")
    described = dict(EXPORT_FILES)
    out.append(_table(("file", "content"), [
        (f"`{f}`", described.get(f, "the backbone in MedicalNet's layout (`state_dict`, `module.` keys), for upstream code"))
        for f in files
    ]))  # fmt: skip
    out.append("## Citation\n")
    out.append(f"```bibtex\n{CITATION}\n```\n")
    return "\n".join(out)


def _encoder_only(config: dict) -> bool:
    return not config.get("num_classes") and not config.get("seg_classes")


def _usage(run: Run, name: str, repo: str) -> list[str]:
    from ..weights.model_files import create_model_kwargs

    kwargs = create_model_kwargs(run.config)
    kwargs.pop("shortcut", None)  # the manifest entry knows it
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items() if not (k == "in_chans" and v == 1))
    if _encoder_only(run.config):
        args = ", num_classes=0" + args.replace(", num_classes=0", "")
    out = ["## How to use\n"]
    out.append(
        "```python\nimport med3d_hub\n\n"
        f"# through a weights manifest that lists {name} (`med3d publish` writes the entry)\n"
        f"model = med3d_hub.create_model({name!r}, pretrained=True{args})\n"
        "preprocess = med3d_hub.transforms_for(model)   # the preprocessing below\n\n"
        "# or straight from this repository\n"
        "from med3d_hub.models import Med3DResNet\n"
        f"model = Med3DResNet.from_pretrained({repo!r})\n```\n"
    )
    if _encoder_only(run.config):
        out.append(
            "For a new task, add a head: `num_classes=K` (linear head on the pooled embedding) or "
            "`seg_classes=K` (MedicalNet's segmentation head); the head starts freshly initialised.\n"
        )
    return out


def _model_section(run: Run, sha256: str | None) -> list[str]:
    config = run.config
    head = {
        None: "none: the encoder alone (the co-training decoder branches are dropped, as in the paper)",
    }.get(run.head, run.head)
    if config.get("class_names"):
        head += f" ({', '.join(config['class_names'])})"
    rows = [
        ("architecture", f"{run.architecture}: {config['block']} blocks {'-'.join(map(str, config['layers']))}, shortcut {config['shortcut']}"),
        ("strides / dilation", f"{config['strides']} / {config['dilation']} (output stride {config['output_stride']})"),
        ("input", f"N x {config['in_chans']} x D x H x W"),
        ("head", head),
        ("embedding", f"{config['num_features']} channels"),
        ("parameters", f"{sum(p.numel() for p in run.model.parameters()):,}"),
    ]
    if sha256:
        rows.append(("sha256 of model.safetensors", f"`{sha256}`"))
    return ["## Model\n", _table(("property", "value"), rows)]


def _preprocessing_section(run: Run) -> list[str]:
    from ..data.preprocess import Preprocess
    from ..inference.features import describe_preprocess

    preprocess = Preprocess.from_dict(run.preprocess)
    out = ["## Preprocessing\n", f"{describe_preprocess(preprocess)}.\n", f"```json\n{json.dumps(run.preprocess)}\n```\n"]
    if run.kind == "co-training run" and preprocess.spacing is None:
        out.append(
            "During co-training every dataset was resampled to its own median voxel spacing; resample new data "
            "to the median spacing of its dataset the same way.\n"
        )
    return out


def _training_data_results(run: Run, files: list[str]) -> list[str]:
    out = []
    if run.training:
        out.append("## Training\n")
        out.append(_recipe(run))
    if run.datasets:
        out.append("## Data\n")
        rows = [(d.name, d.folder or "", d.modality or "", ", ".join(d.labels[1:]) if d.labels else "",
                 str(d.cases) if d.cases is not None else "", d.licence or "") for d in run.datasets]
        out.append(_table(("dataset", "folder", "modality", "foreground classes", "training cases", "licence"), rows))
        out.append("The data is not redistributed here; the datasets are available from their providers.\n")
    if run.validation is not None:
        v = run.validation
        out.append("## Results\n")
        out.append(
            f"Validation Dice at step {v.step} (sliding-window inference, mean over each dataset's foreground "
            "classes), on the validation cases held out from each training dataset. These are the numbers of "
            "the model-index above; they measure the co-training itself, not transfer to a new task.\n"
        )
        rows = [(task, f"{value:.4f}", ", ".join(f"{c} {d:.3f}" for c, d in v.per_class.get(task, {}).items()))
                for task, value in sorted(v.dice.items())]
        if v.mean is not None:
            rows.append(("mean", f"{v.mean:.4f}", ""))
        out.append(_table(("dataset", "Dice", "per class"), rows))
        if "curves.png" in files:
            out.append("![training curves](curves.png)\n")
    return out


def _use_and_limits(run: Run) -> list[str]:
    out = ["## Intended use\n"]
    out.append(
        "Research on 3D medical image analysis: a pretrained encoder to fine-tune for segmentation or "
        "classification of CT and MRI volumes, or to extract features. It is not a medical device and must "
        "not be used for diagnosis or treatment decisions.\n"
    )
    out.append("## Limitations\n")
    limits = [
        "Trained on the datasets listed above only: other scanners, protocols, body regions and populations "
        "may behave differently; check on your own data before relying on the features.",
        f"Expects {run.config['in_chans']}-channel input, preprocessed as above; other normalisations shift the features.",
        "The validation Dice comes from cases of the training datasets (a held-out split), not from an "
        "independent test set.",
    ]
    if run.head is None:
        limits.append("An encoder only: it needs a head and fine-tuning before it predicts anything.")
    out.append("".join(f"- {line}\n" for line in limits))
    return out


def _recipe(run: Run) -> str:
    t = run.training or {}
    lines = []
    processes = run.world_size or 1
    if t.get("steps"):
        lines.append(f"{t['steps']} optimiser steps" + (f" (these weights: step {run.step})" if run.step and run.step != t["steps"] else ""))
    if t.get("batch_size"):
        accum = t.get("accum_steps", 1)
        lines.append(
            f"batch: {t['batch_size']} crops per micro-batch x {accum} accumulation step(s) x {processes} process(es) "
            f"= {t['batch_size'] * accum * processes} crops per step; each micro-batch holds one dataset"
        )
    if t.get("crop"):
        lines.append(f"crop: {' x '.join(map(str, t['crop']))} voxels (D x H x W), foreground oversampling {t.get('foreground_prob', '?')}")
    if t.get("optimizer"):
        extra = f", momentum {t['momentum']}" if t.get("optimizer") == "sgd" and "momentum" in t else ""
        lines.append(f"optimiser: {t['optimizer']}, lr {t.get('lr')}{extra}, weight decay {t.get('weight_decay')}")
    if t.get("schedule"):
        lines.append(f"schedule: {t['schedule']} with {t.get('warmup_steps', 0)} warm-up steps")
    if "amp" in t:
        lines.append(f"mixed precision: {t['amp']}; seed {t.get('seed')}")
    if run.kind == "co-training run":
        lines.append(
            "one shared encoder and one decoder branch per dataset (a 1x1x1 conv to its classes, upsampled to the "
            "crop); loss Dice + cross-entropy; the branches are dropped after training, as in the paper"
        )
    lines.append("the full configuration is in `training_config.yaml`")
    return "".join(f"- {line}\n" for line in lines)


def _table(header: tuple[str, ...], rows) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

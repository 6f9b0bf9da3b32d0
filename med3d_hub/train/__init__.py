"""Co-train the Med3D encoder on 3DSeg-8 style data: shared encoder, one decoder branch per dataset.

    python -m med3d_hub.train --config configs/3dseg8.yaml
    torchrun --nproc_per_node=8 -m med3d_hub.train --config configs/3dseg8.yaml
    med3d train --config configs/3dseg8.yaml --resume

Modules: ``config`` (settings), ``data`` (MSD tasks, checks, preprocessing cache, sampling),
``model`` (encoder + branches), ``engine`` (loop, DDP, AMP, checkpoints), ``evaluate``
(sliding-window Dice), ``metrics`` (jsonl, TensorBoard, curves), ``export``
(``encoder.safetensors``), ``synthetic`` (MSD tasks for tests and trials). See docs/co-training.md.
"""

from .cli import main

__all__ = ["main"]

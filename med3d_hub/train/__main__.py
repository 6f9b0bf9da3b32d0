"""``python -m med3d_hub.train`` and ``torchrun -m med3d_hub.train``."""

from ..cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())

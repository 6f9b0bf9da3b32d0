"""``python -m med3d_hub.features`` and ``torchrun -m med3d_hub.features``."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())

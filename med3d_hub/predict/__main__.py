"""``python -m med3d_hub.predict`` and ``torchrun -m med3d_hub.predict``."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())

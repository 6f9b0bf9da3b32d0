"""``python -m med3d_hub.fid`` and ``torchrun -m med3d_hub.fid``."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())

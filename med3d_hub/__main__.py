"""`python -m med3d_hub` runs the `med3d` command."""

from .cli.app import main

if __name__ == "__main__":
    raise SystemExit(main())

"""The `med3d` command: one module per command group, thin over the layers below."""


def main(argv=None) -> int:
    """The `med3d` command (console script `med3d_hub.cli:main`); the work is in `app.main`."""
    from .app import main as run

    return run(argv)

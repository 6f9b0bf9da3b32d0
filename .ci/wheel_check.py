"""What a user runs first, against the installed wheel (.ci/wheel.sh runs it from an empty folder).

`med3d list`, `med3d demo --pretrained none`, `create_model(..., pretrained=<local file>)` and
every packaged recipe, each from the wheel's own files: the package must come from the wheel's
environment and nothing on sys.path may hold another copy of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

VENV = Path(os.environ["MED3D_WHEEL_VENV"]).resolve()


def med3d(*args: str) -> str:
    print("$ med3d", *args, flush=True)
    done = subprocess.run([str(VENV / "bin" / "med3d"), *args], capture_output=True, text=True)
    print(done.stdout + done.stderr, end="", flush=True)
    if done.returncode != 0:
        sys.exit(f"wheel: `med3d {' '.join(args)}` exited {done.returncode}")
    return done.stdout


def main() -> None:
    import med3d_hub

    where = Path(med3d_hub.__file__).resolve()
    assert VENV in where.parents, f"med3d_hub came from {where}, not from the wheel installed in {VENV}"
    copies = [p for p in sys.path if p and Path(p, "med3d_hub").is_dir() and VENV not in Path(p).resolve().parents]
    assert not copies, f"another med3d_hub is on sys.path: {copies}"

    listing = med3d("list")
    assert "resnet10" in listing and "resnet50" in listing, "med3d list shows no weights: the manifest is missing"

    with tempfile.TemporaryDirectory() as tmp:
        med3d("demo", "--pretrained", "none", "--out-dir", tmp)
        pictures = sorted(p.name for p in Path(tmp).glob("*.png"))
        assert "mni152_resnet10.png" in pictures, pictures

        import torch
        from safetensors.torch import save_file

        model = med3d_hub.create_model("resnet10", num_classes=0)
        path = Path(tmp) / "my_resnet10.safetensors"
        save_file(model.state_dict(), path)
        loaded = med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0).state_dict()
        assert all(torch.equal(value, loaded[key]) for key, value in model.state_dict().items())
        print(f"create_model('resnet10', pretrained={str(path)!r}): the file's {len(loaded)} tensors, equal")

    from med3d_hub.training.config import load_config, packaged_configs
    from med3d_hub.training.finetune_config import load_finetune_config

    recipes = packaged_configs()
    assert recipes, "the wheel ships no recipes (med3d_hub/configs)"
    for name in recipes:
        load = load_finetune_config if name.startswith("finetune-") else load_config
        load(f"configs/{name}")
    print(f"recipes: {', '.join(recipes)} load from the wheel")
    print("=== wheel: passed")


if __name__ == "__main__":
    main()

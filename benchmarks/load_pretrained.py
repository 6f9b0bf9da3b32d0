"""Time create_model(pretrained=...) for a MedicalNet-format file: first load (hash, torch.load, convert)
against later loads (memory-mapped safetensors cache), and a random-init build for comparison.

    python benchmarks/load_pretrained.py [resnet50]

Each variant runs in a fresh process, with a private HF_HOME, on random weights of the real layout.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MAKE = """
import sys, torch
sys.path.insert(0, {tests!r})
from medicalnet_files import medicalnet_bytes
open({path!r}, "wb").write(medicalnet_bytes({arch!r}))
"""

_TIME = """
import time, torch
torch.set_num_threads(1)
import med3d_hub
start = time.perf_counter()
if {pretrained!r}:
    model = med3d_hub.create_model({arch!r}, pretrained={pretrained!r}, num_classes=2)
else:
    model = med3d_hub.create_model({arch!r}, num_classes=2)
print(f"{{time.perf_counter() - start:.3f}}")
"""


def run(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "resnet50"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HOME": tmp, "OMP_NUM_THREADS": "1"}
        path = f"{tmp}/{arch}.pth"
        run(_MAKE.format(tests=str(ROOT / "tests"), path=path, arch=arch), env)
        print(f"{arch}: {os.path.getsize(path) / 1e6:.0f} MB MedicalNet-format file, 1 thread")
        print(f"  random init, no weights     {run(_TIME.format(arch=arch, pretrained=''), env)} s")
        print(f"  first load (convert, cache) {run(_TIME.format(arch=arch, pretrained=path), env)} s")
        for i in range(3):
            print(f"  cached load {i + 1}               {run(_TIME.format(arch=arch, pretrained=path), env)} s")


if __name__ == "__main__":
    main()

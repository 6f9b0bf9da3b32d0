"""The command blocks of the README and the docs for prediction, feature metrics and the smaller
installs, run as written in a folder that holds what they name (runs, scans, DICOM folders).

The commands go through a ``med3d`` on PATH and bash, as a user types them. A command that needs the
Hub's weights or the network (``--pretrained 3dseg8``, ``pip install``) or a viewer that is not
installed is listed below with the reason; every other command of a covered block runs and must exit 0.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

from scan_files import ROOT, med3d_env, write_dicom_series  # noqa: E402

from med3d_hub.cli import app as cli  # noqa: E402

# Commands (as written, continuations joined) that the test does not run, and why. The runs and
# feature files they would make are made offline by the fixtures below instead.
NOT_RUN = {
    "med3d finetune seg --data Task03_Liver --model resnet50 --pretrained 3dseg8 --output runs/liver":
        "downloads resnet50.3dseg8; runs/liver is a 2-step resnet10 run here",
    "med3d finetune cls --csv nodules.csv --model resnet34 --pretrained 3dseg8 --num-classes 2 "
    "--set 'class_names=[benign,malignant]' --output runs/nodule":
        "downloads resnet34.3dseg8; runs/nodule is a 2-step resnet10 run here",
    "med3d fid real/ synthetic/ --model resnet50 --json scores.json": "downloads resnet50.3dseg8",
    "med3d fid real/*.nii.gz synthetic/*.nii.gz --model resnet50": "downloads resnet50.3dseg8",
    "med3d features real/*.nii.gz -o real.npz --model resnet50": "downloads resnet50.3dseg8; real.npz is made offline",
    "med3d fid real.npz synthetic/ --model resnet50 --bootstrap 1000 --seed 0": "downloads resnet50.3dseg8",
    "med3d download resnet10.23datasets": "downloads resnet10.23datasets",
    "OMP_NUM_THREADS=2 nice -n 10 python benchmarks/metrics_mni152.py --pretrained 23datasets":
        "downloads resnet10.23datasets and nilearn's MNI152 (a benchmark, minutes)",
    "med3d fid /tmp/med3d-metrics/real.npz /tmp/med3d-metrics/noise-0.2.npz --json scores.json --seed 0 "
    "--bandwidth 0.07575486048650959": "reads the feature files of the benchmark above",
    ".venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu": "needs the network",
    '.venv/bin/pip install -e ".[io]"': "needs the network (the table's uses are checked by hiding the other extras)",
}
VIEWERS = ("itksnap",)  # run only where installed

# The blocks covered: (file, the heading the block is under, language).
PREDICT_BLOCKS = [("README.md", "Co-training, fine-tuning and publishing", "bash#3"),
                  ("docs/predict.md", "Fine-tune -> predict -> open in a viewer", "bash"),
                  ("docs/predict.md", "Fine-tune -> predict -> open in a viewer", "bash#2"),
                  ("docs/predict.md", "Python", "python")]
METRICS_BLOCKS = [("docs/metrics.md", "Feature metrics for 3D generative models: FID, KID and MMD", "bash"),
                  ("docs/metrics.md", "In Python", "python"),
                  ("docs/metrics.md", "Worked example: MNI152 scans, corrupted at increasing strength", "bash"),
                  ("docs/metrics.md", "Worked example: MNI152 scans, corrupted at increasing strength", "bash#2")]
INSTALL_BLOCKS = [("README.md", "Smaller installs", "bash")]


def fenced_blocks(path: Path) -> dict[tuple[str, str], list[str]]:
    """``(heading, language)`` -> the text of each fenced block under that heading, in order."""
    found: dict[tuple[str, str], list[str]] = {}
    heading, lang, lines = "", None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if lang is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif lang is None and line.startswith("```"):
            lang, lines = line[3:].strip(), []
        elif lang is not None and line.startswith("```"):
            found.setdefault((heading, lang), []).append("\n".join(lines) + "\n")
            lang = None
        elif lang is not None:
            lines.append(line)
    return found


def block(file: str, heading: str, lang: str) -> str:
    lang, _, nth = lang.partition("#")
    return fenced_blocks(ROOT / file)[(heading, lang)][int(nth or 1) - 1]


def commands(text: str) -> list[str]:
    """The shell commands of a block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", text)
    out = []
    for line in joined.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
        if command:
            out.append(re.sub(r"\s+", " ", command))
    return out


def run_block(text: str, cwd: Path, env: dict) -> list[str]:
    """Run each command of a bash block in ``cwd``; returns the commands run."""
    ran = []
    for command in commands(text):
        if command in NOT_RUN or (command.split()[0] in VIEWERS and shutil.which(command.split()[0]) is None):
            continue
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        ran.append(command)
    return ran


def med3d_on_path(tmp: Path, hidden: tuple[str, ...] = ()) -> dict:
    """An environment whose PATH has a ``med3d`` of this checkout; ``hidden`` modules cannot be imported."""
    bin_dir = tmp / f"bin-{len(list(tmp.glob('bin-*')))}"
    bin_dir.mkdir()
    script = bin_dir / "med3d"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      f"sys.modules.update(dict.fromkeys({list(hidden)!r}))  # not installed\n"
                      "from med3d_hub.cli.app import main\nsys.exit(main())\n")
    script.chmod(0o755)
    env = med3d_env(tmp)
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


# -- a folder holding what the prediction blocks name ---------------------------------------------------


@pytest.fixture(scope="module")
def predict_folder(tmp_path_factory) -> Path:
    """runs/liver (segmentation: background, liver, tumour), runs/nodule (benign, malignant), ct/, scans/,
    dicom_dir/ and dicom/patient7/ (a DICOM series)."""
    pytest.importorskip("monai")
    pytest.importorskip("yaml")
    from med3d_hub.cli.finetune import main as finetune
    from med3d_hub.training.synthetic import make_synthetic_task
    from med3d_hub.training.synthetic_classification import make_synthetic_classification

    work = tmp_path_factory.mktemp("docs-predict")
    common = ["--model", "resnet10", "--pretrained", "none", "--crop", "16", "16", "16", "--workers", "0",
              "--device", "cpu", "-q", "--steps", "2", "--val-every", "2", "--cache-dir", str(work / "cache")]
    task = make_synthetic_task(work / "data", "Liver", num_classes=3, num_cases=4, shape=(20, 24, 20), seed=3)
    meta = json.loads((task / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "liver", "2": "tumour"}
    (task / "dataset.json").write_text(json.dumps(meta))
    assert finetune(["seg", "--data", str(task), "--output", str(work / "runs" / "liver"), "--decoder", "conv_seg",
                     "--batch-size", "2", "--set", "val_fraction=0.25", *common]) == 0
    labels = make_synthetic_classification(work / "cls", num_cases=8, shape=(16, 18, 16), seed=4)
    assert finetune(["cls", "--csv", str(labels), "--output", str(work / "runs" / "nodule"), "--num-classes", "2",
                     "--set", "class_names=[benign,malignant]", "--batch-size", "4", *common]) == 0

    for folder in ("ct", "scans"):
        (work / folder).mkdir()
    for i, image in enumerate(sorted((task / "imagesTr").glob("*.nii.gz"))[:2], start=1):
        shutil.copy(image, work / "ct" / f"case_{i:03d}.nii.gz")
        shutil.copy(image, work / "scans" / f"nodule_{i:03d}.nii.gz")
    ras = np.random.default_rng(0).integers(-200, 300, (18, 20, 16)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for folder in ("dicom_dir", "dicom/patient7"):
        write_dicom_series(work / folder, ras, affine)
    return work


@pytest.mark.slow
def test_the_prediction_blocks_run_as_written(predict_folder, tmp_path):
    env = med3d_on_path(tmp_path)
    ran = []
    for file, heading, lang in PREDICT_BLOCKS:
        text = block(file, heading, lang)
        if lang == "python":
            done = subprocess.run([sys.executable, "-c", text], cwd=predict_folder, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, f"{file}, {heading}:\n{done.stderr[-3000:]}"
        else:
            ran += run_block(text, predict_folder, env)
    assert any(c.startswith("med3d predict runs/liver ct/*.nii.gz dicom_dir/") for c in ran)  # the README's
    masks = predict_folder / "masks"
    for scan in ("case_001", "case_002"):
        mask = nib.load(masks / f"{scan}.nii.gz")
        assert mask.shape == nib.load(predict_folder / "ct" / f"{scan}.nii.gz").shape
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
        assert json.loads((masks / f"{scan}.json").read_text())["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert (masks / "case_001_probabilities.npz").is_file() and (masks / "patient7.nii.gz").is_file()
    header = (predict_folder / "predictions.csv").read_text().splitlines()[0]
    assert header == "file,p_benign,p_malignant,predicted"  # what docs/predict.md says it gives
    assert sorted(p.name for p in (predict_folder / "masks").glob("0*.nii.gz")) == ["000.nii.gz", "001.nii.gz"]


# -- feature metrics ------------------------------------------------------------------------------------


def test_the_metrics_blocks_run_as_written(tmp_path):
    env = med3d_on_path(tmp_path)
    for name in ("real", "synthetic"):  # what `med3d features ... -o real.npz --model resnet50` writes, offline
        rng = np.random.default_rng(len(name))
        (tmp_path / name).mkdir()
        scans = []
        for i in range(6):
            np.save(tmp_path / name / f"{i}.npy", rng.random((12, 16, 16), dtype=np.float32))
            scans.append(str(tmp_path / name / f"{i}.npy"))
        assert cli.main(["features", *scans, "--pretrained", "none", "--size", "16", "16", "16",
                         "-o", str(tmp_path / f"{name}.npz"), "-q"]) == 0
    ran = run_block(block(*METRICS_BLOCKS[0]), tmp_path, env)
    assert ran == ["med3d fid real.npz synthetic.npz --json scores.json"]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["fid"] > 0 and scores["sets"][0]["volumes"] == 6

    python = block(*METRICS_BLOCKS[1])
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# -- the smaller installs -------------------------------------------------------------------------------

# The import names of the packages of the extras (pyproject.toml), where they differ from the name.
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-learn": "sklearn", "simpleitk": "SimpleITK", "import-linter": "importlinter",
                "pytest-timeout": "pytest_timeout", "mkdocs-material": "material"}
# Installed by the core dependencies anyway (huggingface_hub needs them): never hidden.
PULLED_IN = {"yaml", "tqdm"}


def hidden_without(extras: set[str]) -> tuple[str, ...]:
    """The modules of every extra that an install of ``extras`` (and the core) does not bring."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def modules(names) -> set[str]:
        specs = [s for n in names for s in optional[n] if not s.startswith("med3d-hub")]
        return {IMPORT_NAMES.get(name, name) for name in (re.match(r"[\w.-]+", s).group(0).lower() for s in specs)}

    return tuple(sorted(modules(optional) - modules(extras) - PULLED_IN))


def install_table() -> dict[str, str]:
    """README's "Smaller installs" table: use -> the `pip install -e ".[...]"` of that row."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Smaller installs", 1)[1].split("###", 1)[0]
    return dict(re.findall(r"^\| (.+?) \| `pip install -e \"\.\[([a-z,]+)\]\"` \|$", section, flags=re.M))


@pytest.mark.slow
def test_the_smaller_installs_give_what_the_readme_table_says(tmp_path):
    table = install_table()
    assert set(table.values()) == {"io", "io,demo", "io,train", "io,deploy", "all,test,docs"}, table
    ran = run_block(block(*INSTALL_BLOCKS[0]), tmp_path, med3d_on_path(tmp_path))
    assert ran == ["python3 -m venv .venv"] and (tmp_path / ".venv" / "bin" / "python").exists()

    np.save(tmp_path / "scan.npy", np.random.default_rng(0).random((12, 16, 16), dtype=np.float32))
    io_only = med3d_on_path(tmp_path, hidden_without({"io"}))
    assert "monai" in hidden_without({"io"}) and "nibabel" not in hidden_without({"io"})
    features = ["bash", "-c", "med3d features scan.npy --pretrained none --size 16 16 16 -o feats.npy -q"]
    done = subprocess.run(features, cwd=tmp_path, env=io_only, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and np.load(tmp_path / "feats.npy").shape == (1, 512), done.stderr
    finetune = ["bash", "-c", "med3d finetune seg --data Task03_Liver --model resnet50 --pretrained 3dseg8 --output runs/liver"]
    done = subprocess.run(finetune, cwd=tmp_path, env=io_only, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs the train extra" in done.stderr and "pip install" in done.stderr, done.stderr

    with_train = med3d_on_path(tmp_path, hidden_without({"io", "train"}))
    for command in ("med3d finetune seg --help", "med3d compare --help", "med3d train --help"):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=with_train, capture_output=True, text=True)
        assert done.returncode == 0 and "needs the train extra" not in done.stdout + done.stderr, (command, done.stderr)


def test_every_command_left_out_is_still_in_the_docs():
    documented = {c for blocks in (PREDICT_BLOCKS, METRICS_BLOCKS, INSTALL_BLOCKS) for b in blocks
                  if not b[2].startswith("python") for c in commands(block(*b))}
    assert set(NOT_RUN) <= documented, set(NOT_RUN) - documented

"""One config base, a section per task: inapplicable keys are refused, numbers written as text are
read, and fine-tuning configs saved by the earlier single dataclass still load."""

from __future__ import annotations

import pytest

yaml = pytest.importorskip("yaml")

from med3d_hub.cli import finetune as finetune_cli  # noqa: E402
from med3d_hub.cli import train as train_cli  # noqa: E402
from med3d_hub.training.config import ConfigError, TaskConfig, TrainConfig, load_config  # noqa: E402
from med3d_hub.training.finetune_config import (  # noqa: E402
    ClsFinetuneConfig, FinetuneConfig, SegFinetuneConfig, load_finetune_config,
)

LIVER = {"name": "Liver", "path": "Task03_Liver", "num_classes": 3}


def _write(tmp_path, data: dict, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_seg_recipe_with_top_level_intensity_fails_and_says_where_it_goes(tmp_path):
    recipe = _write(tmp_path, {"task": "seg", "tasks": [LIVER], "intensity": {"method": "hu_window", "min": -200, "max": 250}})
    args = finetune_cli.parser().parse_args(["seg", "--config", str(recipe)])
    with pytest.raises(ConfigError, match=r"key 'intensity' does not apply to segmentation fine-tuning.*under `tasks:`"):
        finetune_cli.build_config(args)
    recipe = _write(tmp_path, {"task": "seg", "tasks": [LIVER], "spacing": [1, 1, 1]})
    with pytest.raises(ConfigError, match=r"key 'spacing' does not apply.*median voxel spacing"):
        load_finetune_config(recipe)
    with pytest.raises(ConfigError, match=r"key 'intensity' does not apply to the co-training"):
        load_config(_write(tmp_path, {"tasks": [LIVER], "intensity": {"method": "none"}}))
    # where it belongs, the same setting is taken
    moved = _write(tmp_path, {"task": "seg", "tasks": [{**LIVER, "intensity": {"method": "none"}}]})
    assert load_finetune_config(moved).tasks[0].intensity == {"method": "none"}


@pytest.mark.parametrize("cls, key, value, names", [
    (ClsFinetuneConfig, "tasks", [LIVER], "segmentation runs"),
    (ClsFinetuneConfig, "decoder", "conv_seg", "segmentation fine-tuning"),
    (ClsFinetuneConfig, "foreground_prob", 0.5, "segmentation runs"),
    (SegFinetuneConfig, "class_weights", "balanced", "classification fine-tuning"),
    (SegFinetuneConfig, "drop_rate", 0.2, "classification fine-tuning"),
    (TrainConfig, "pretrained", "default", "fine-tuning"),  # the co-training starts from random weights
    (TrainConfig, "decoder", "paper", "segmentation fine-tuning"),
])
def test_keys_of_other_sections_are_refused_by_name(cls, key, value, names):
    with pytest.raises(ConfigError, match=rf"key '{key}' does not apply to .*{names}"):
        cls.from_dict({key: value})
    with pytest.raises(ConfigError, match=rf"key '{key}'"):
        cls().replace(**{key: value}) if cls is not ClsFinetuneConfig else cls(csv="x.csv").replace(**{key: value})


def test_set_overrides_take_numbers_written_as_text(tmp_path):
    args = train_cli.parser().parse_args(["--set", "warmup_lr=1e-4", "--set", "min_lr=1e-6", "--set", "grad_clip=1e1"])
    cfg = train_cli.build_config(args)
    assert (cfg.warmup_lr, cfg.min_lr, cfg.grad_clip) == (1e-4, 1e-6, 10.0)
    assert isinstance(cfg.warmup_lr, float)
    args = finetune_cli.parser().parse_args(["cls", "--csv", "x.csv", "--set", "lr=1e-4", "--set", "class_weights=[1, 3e0]",
                                             "--set", "new_layers_lr_mult=1e2"])
    cfg = finetune_cli.build_config(args)
    assert (cfg.lr, cfg.class_weights, cfg.new_layers_lr_mult) == (1e-4, [1, 3.0], 100.0)
    recipe = _write(tmp_path, {"steps": 5, "lr": "1e-3", "tasks": []})
    assert load_config(recipe).lr == 1e-3
    with pytest.raises(ConfigError, match="warmup_lr must be a number, got 'fast'"):
        train_cli.build_config(train_cli.parser().parse_args(["--set", "warmup_lr=fast"]))
    with pytest.raises(ConfigError, match="steps must be an integer"):
        train_cli.build_config(train_cli.parser().parse_args(["--set", "steps=1e3"]))


def test_fine_tuning_configs_saved_by_the_single_dataclass_still_load(tmp_path):
    """Earlier versions wrote every key of both data sections into training_config.yaml."""
    seg = {**SegFinetuneConfig(tasks=[TaskConfig(**LIVER)]).to_dict(), "csv": None, "num_classes": None,
           "class_names": None, "class_weights": None, "intensity": None, "spacing": None, "drop_rate": 0.0}
    cls = {**ClsFinetuneConfig(csv="nodules.csv", num_classes=2).to_dict(), "tasks": [], "data_root": ".",
           "foreground_prob": 0.33, "val_overlap": 0.25, "decoder": "paper"}
    loaded = load_finetune_config(_write(tmp_path, seg, "seg.yaml"))
    assert isinstance(loaded, SegFinetuneConfig) and loaded.to_dict() == SegFinetuneConfig(tasks=[TaskConfig(**LIVER)]).to_dict()
    loaded = load_finetune_config(_write(tmp_path, cls, "cls.yaml"))
    assert isinstance(loaded, ClsFinetuneConfig) and loaded.num_classes == 2 and not hasattr(loaded, "tasks")
    # a resumed run compares only the keys its own dataclass has
    from med3d_hub.training.checkpoint import check_resumable

    state = {"config": cls, "data": {"micro_batches_per_step": 1}}
    check_resumable(state, loaded, 1, 1, lambda *_: None, ("task", "pretrained", "csv", "intensity", "decoder"))
    with pytest.raises(Exception, match="csv"):
        check_resumable(state, loaded.replace(csv="other.csv"), 1, 1, lambda *_: None, ("csv",))


def test_the_task_key_picks_the_dataclass(tmp_path):
    assert type(FinetuneConfig.from_dict({"task": "cls", "csv": "x.csv"})) is ClsFinetuneConfig
    assert type(FinetuneConfig.from_dict({"tasks": [LIVER]})) is SegFinetuneConfig
    assert type(load_finetune_config(_write(tmp_path, {"csv": "x.csv"}), task="cls")) is ClsFinetuneConfig
    with pytest.raises(ConfigError, match="task is 'cls'"):
        SegFinetuneConfig(task="cls")
    with pytest.raises(TypeError, match="build one of those"):
        FinetuneConfig()
    recipe = _write(tmp_path, {"task": "cls", "csv": "x.csv"})
    with pytest.raises(ConfigError, match="finetune cls"):
        finetune_cli.build_config(finetune_cli.parser().parse_args(["seg", "--config", str(recipe)]))

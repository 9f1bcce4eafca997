"""tags=[paper,cpu] (lightning-hydra-template's habit): a top-level setting, checked by the schema, recorded in
identity.json's settings and metrics.json, one a continuation may change, and what `python src/report.py <dirs>
--tags paper,cpu` selects runs by (every given tag held). W&B and TensorBoard: tests/test_wandb.py."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from allconv import run_folder, schema, training
from allconv.errors import ConfigError
from allconv.report import main as report_main
from conftest import CONF, write_npz

QUIET = ["callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
         "callbacks.guided_backprop.every_n_epochs=0", "callbacks.checkpoint.every_n_epochs=0"]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_tags_are_a_checked_top_level_setting():
    assert composed().tags == []
    schema.validate(composed("tags=[paper,cpu]"), schema.TrainConfig)
    for bad in ("tags=paper", "tags=['a,b']", "tags=['a b']", "tags=['']"):
        with pytest.raises(ConfigError, match=r"^tags=.*: must be a list of tags, each 1 to 64 characters, no comma"):
            schema.validate(composed(bad), schema.TrainConfig)


def test_a_continuation_may_change_the_tags_and_nothing_else_with_them():
    recorded = run_folder.settings(composed("tags=[paper]"))
    assert run_folder.differences(recorded, run_folder.settings(composed("tags=[paper,cpu]"))) == []
    other_seed = run_folder.settings(composed("tags=[paper,cpu]", "seed=1"))
    assert run_folder.differences(recorded, other_seed) == ["seed 0 vs 1"]


def test_report_selects_the_runs_holding_every_given_tag(tmp_path, shared_cache_dir, capsys):
    npz = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    base = ["data=npz", f"data.path={npz}", "data.preprocess=standardize", "model.width=0.125", "data.batch_size=32",
            "trainer.max_epochs=1", *QUIET]
    for seed, tags in ((0, "[paper,cpu]"), (1, "[paper]")):
        training.train(composed(*base, f"seed={seed}", f"tags={tags}"), tmp_path / "runs" / f"s{seed}")
    s0 = tmp_path / "runs" / "s0"
    assert json.loads((s0 / "metrics.json").read_text())["tags"] == ["paper", "cpu"]
    assert json.loads((s0 / "identity.json").read_text())["settings"]["tags"] == ["paper", "cpu"]

    def seeds(*args: str) -> str:
        assert report_main([str(tmp_path / "runs"), "--no-plot", "--out", str(tmp_path / "out"), *args]) == 0
        text = capsys.readouterr().out
        return next(line for line in text.splitlines() if line.startswith("| All-CNN-C")).split("|")[4].strip()

    assert seeds() == "0, 1"
    assert seeds("--tags", "paper") == "0, 1"
    assert seeds("--tags", "cpu,paper") == "0"  # every tag, in any order
    assert report_main([str(tmp_path / "runs"), "--no-plot", "--tags", "gpu"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 2 runs under ") and "--tags gpu" in err, err

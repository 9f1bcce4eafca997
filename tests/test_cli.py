"""The command line: --help opens with the project's usage and lists only options a user can pick."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.subprocess
def test_help_opens_with_the_usage_and_lists_real_options(tmp_path):
    rc, out, err = run_cli("--help", cwd=tmp_path)
    assert rc == 0, err
    assert out.startswith("allconv: the 12 networks")
    assert "python src/train.py resume=<run dir>" in out
    groups = out.split("== Config groups")[1].split("== The composed config")[0]
    assert "data: cifar10, cifar100, npz" in groups and "_common" not in groups
    assert "W&B sweep specs for `wandb sweep`" in out  # conf/sweep/ is said to be no option of this command

"""The command line: --help opens with the project's usage and lists only options a user can pick."""

from __future__ import annotations

import ast

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


COUNTING = '''
import collections, runpy, sys
import torch
sys.path.insert(0, {src!r})
from allconv import data, models, visualize
calls = collections.Counter()

def count(module, name, key=None):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        if name == "build":
            key_ = "build_meta" if next(out.parameters()).is_meta else "build"
        else:
            key_ = name
        calls[key_] += 1
        return out
    setattr(module, name, wrapper)

count(models, "build"); count(data, "load_npz"); count(data, "check_npz"); count(visualize, "validate")
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path({train!r}, run_name="__main__")
finally:
    print("CALLS", dict(calls), file=sys.stderr)
'''


@pytest.mark.subprocess
def test_one_run_builds_the_network_once_reads_the_data_once_and_probes_the_layer_once(tmp_path):
    from conftest import SRC, TRAIN_PY, write_npz

    npz = write_npz(tmp_path / "tiny.npz", n_train=32, n_test=16)
    script = tmp_path / "count.py"
    script.write_text(COUNTING.format(src=str(SRC), train=str(TRAIN_PY)))
    rc, out, err = run_cli("data=npz", f"data.path={npz}", "model.width=0.125", "trainer.accelerator=cpu",
                           "trainer.max_epochs=1", "callbacks.progress_bar=none", "data.batch_size=16",
                           "data.preprocess=none", "print_config=false", "callbacks.guided_backprop.layer=block2.down",
                           f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, script=script)
    assert rc == 0, err[-3000:]
    calls = ast.literal_eval(err.split("CALLS", 1)[1].strip().splitlines()[0])
    # build_meta: the pre-flight check's structure-only network (no memory, no init); build: the trained one
    assert calls == {"build_meta": 1, "build": 1, "check_npz": 1, "load_npz": 1, "validate": 1}, calls

"""A composition error's one line (cli._one_line) offers `+key=value` only where it would compose and pass the
schema; `+key` on a key the config has says to drop the +; Lightning's gradient clipping points to the project's
cap, optim.max_update_norm, whether given with or without +. Each through the real entry point (Hydra, the
pre-flight), nothing written."""

from __future__ import annotations

import pytest

CASES = [
    (["+trainer.precision=16"], "error: +trainer.precision: trainer.precision is already a setting, so + cannot add "
                                "it; set it without the +: trainer.precision=<value>"),
    (["+seed=3"], "error: +seed: seed is already a setting, so + cannot add it; set it without the +: seed=<value>"),
    (["trainer.max_steps=3"], "error: Could not override 'trainer.max_steps': Key 'max_steps' is not in struct "
                              "(add it with +trainer.max_steps=<value>)"),
    (["nope=1"], "error: Could not override 'nope': Key 'nope' is not in struct (not a setting of allconv)"),
    (["optim.lrr=0.1"], "error: Could not override 'optim.lrr': Key 'lrr' is not in struct (not a setting of allconv; "
                        "did you mean optim.lr?)"),
    (["model.nope=1"], "error: Could not override 'model.nope': Key 'nope' is not in struct "
                       "(not a setting of allconv)"),
]
CAP = ("this project caps each update instead: optim.max_update_norm=<cap> (lr * |g| <= cap, the global L2 norm; "
       "optim.max_update_norm=null: plain SGD)")


@pytest.mark.parametrize("args, line", CASES)
def test_the_hint_is_one_that_works(run_entry, tmp_path, args, line):
    rc, out, err = run_entry(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert rc == 2 and err == line + "\n", err
    assert not (tmp_path / "run").exists()


def test_the_added_key_the_hint_offers_composes(run_entry, tmp_path):
    """`+trainer.max_steps=3`, as the hint says, passes composition and the schema: the run stops at the data check."""
    rc, out, err = run_entry("+trainer.max_steps=3", "data=npz", f"data.path={tmp_path / 'none.npz'}",
                             "hydra.run.dir=run", cwd=tmp_path)
    assert rc == 2 and err.startswith("error: data.path") and "max_steps" not in err, err


@pytest.mark.parametrize("arg", ["trainer.gradient_clip_val=1", "+trainer.gradient_clip_val=1",
                                 "+trainer.gradient_clip_algorithm=value"])
def test_lightning_gradient_clipping_points_to_the_projects_cap(run_entry, tmp_path, arg):
    rc, out, err = run_entry(arg, "hydra.run.dir=run", cwd=tmp_path)
    assert rc == 2 and err.count("\n") == 1 and err.rstrip().endswith(CAP), err
    assert "optim.max_update_norm" in err and "add it with" not in err and "+key" not in err
    assert not (tmp_path / "run").exists()

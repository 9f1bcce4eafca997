"""Importing allconv changes nothing in the process; cli.setup() makes the changes, and every process that runs a
job calls it: the entry points, and a launcher's worker when it unpickles the pre-flight callback."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import textwrap

import pytest

from conftest import PYTHON, SRC

# The state setup() changes, read in a fresh interpreter: allconv's resolver, the warning filters and argparse's
# error(); Hydra's own modules are left as they are (a run's record is the project's, Hydra writes none of it).
PROBE = textwrap.dedent("""
    import argparse, json, sys, warnings
    from hydra._internal.core_plugins import basic_sweeper
    from hydra.core import utils
    from omegaconf import OmegaConf

    def state():
        return {"save_config": utils._save_config.__module__, "sweeper": type(basic_sweeper.OmegaConf).__name__,
                "resolver": OmegaConf.has_resolver("allconv.job_folder"),
                "filters": [f[1].pattern if f[1] is not None else None for f in warnings.filters],
                "argparse": argparse.ArgumentParser.error.__module__}
""")


def run_probe(body: str) -> list[dict]:
    out = subprocess.run([PYTHON, "-c", PROBE + textwrap.dedent(body)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.subprocess
def test_importing_changes_nothing_and_setup_installs_what_a_job_needs():
    before, imported, set_up, again = run_probe("""
        print(json.dumps(state()))
        import allconv.cli, allconv.training, allconv.callbacks, allconv.wandb_logger, allconv.tensorboard_logger
        import hydra_plugins.allconv_launchers.slurm_launcher
        print(json.dumps(state()))
        allconv.cli.setup()
        print(json.dumps(state()))
        allconv.cli.setup()
        print(json.dumps(state()))
    """)
    from allconv.cli import IGNORED_WARNINGS

    assert not set(imported["filters"]) & set(IGNORED_WARNINGS)  # the libraries imported add their own filters
    assert {**imported, "filters": None} == {**before, "filters": None}
    assert set_up["save_config"] == "hydra.core.utils" and set_up["sweeper"] == "type"  # Hydra's own OmegaConf class
    assert set_up["resolver"] and not before["resolver"]
    assert set_up["filters"][:len(IGNORED_WARNINGS)] == list(reversed(IGNORED_WARNINGS))
    assert set_up["filters"][len(IGNORED_WARNINGS):] == imported["filters"]
    assert again == set_up  # a second call adds nothing
    assert set_up["argparse"] == "argparse"  # argparse is changed only inside cli.one_line_usage_errors()


@pytest.mark.subprocess
def test_a_worker_that_unpickles_the_preflight_callback_is_set_up():
    """What a joblib or submitit worker does with the Hydra context it receives: unpickle it, then run the job."""
    from allconv.cli import Preflight

    pickled = pickle.dumps(Preflight(check="allconv.checks.check", schema="allconv.schema.TrainConfig",
                                     run_folders=True))
    before, after = run_probe(f"""
        import pickle
        print(json.dumps(state()))
        callback = pickle.loads({pickled!r})
        assert callback.run_folders is True and callback.schema.__name__ == "TrainConfig"
        print(json.dumps(state()))
    """)
    assert not before["resolver"] and after["resolver"]


@pytest.mark.parametrize("script", ["train.py", "eval.py", "visualize.py", "report.py"])
def test_each_entry_point_calls_setup_before_anything_else_runs(script):
    """The first statement under `if __name__ == "__main__":` (after its imports) is cli.setup()."""
    tree = ast.parse((SRC / script).read_text())
    main_block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    first = next(n for n in main_block.body if not isinstance(n, (ast.Import, ast.ImportFrom)))
    assert ast.unparse(first) == "cli.setup()", script

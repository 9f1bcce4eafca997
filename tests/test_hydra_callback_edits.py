"""What allconv relies on when its Hydra callbacks edit the config they are given: Hydra goes on with that same object.

cli.Preflight.on_run_start sets hydra.output_subdir to null for a rank started by torchrun or srun (run_job reads it
next), and run_folder.plan_sweep, from Preflight.on_multirun_start, appends to hydra.overrides.hydra (the sweeper
composes each job from it). Hydra documents callbacks as observers; this fails when Hydra stops passing the config it
goes on with (pyproject.toml pins hydra-core to the range tested, 1.3.x).
"""

from __future__ import annotations

import inspect
import re

from hydra._internal.hydra import Hydra


def calls_in_order(source: str, *patterns: str) -> bool:
    at = 0
    for pattern in patterns:
        found = re.compile(pattern, re.S).search(source, at)
        if found is None:
            return False
        at = found.end()
    return True


def test_a_run_s_callbacks_get_the_config_run_job_runs():
    source = inspect.getsource(Hydra.run)
    assert calls_in_order(source, r"callbacks\.on_run_start\(config=cfg\b", r"run_job\(.*?config=cfg\b")
    assert source.count("cfg = ") == 1  # not composed again in between


def test_a_sweep_s_callbacks_get_the_config_its_sweeper_runs():
    source = inspect.getsource(Hydra.multirun)
    assert calls_in_order(source, r"callbacks\.on_multirun_start\(config=cfg\b",
                          r"instantiate_sweeper\(\s*config=cfg\b")
    assert source.count("cfg = ") == 1

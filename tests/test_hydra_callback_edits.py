"""What allconv relies on when its Hydra callbacks edit the config they are given: Hydra goes on with that same object.

sweep_folder.plan, from Preflight.on_multirun_start, appends to hydra.overrides.hydra when a relaunched run moved to
another job number (the sweeper composes each job from it). Hydra documents callbacks as observers; this fails when
Hydra stops passing the config it goes on with (pyproject.toml pins hydra-core to the range tested, 1.3.x).
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


def test_a_sweep_s_callbacks_get_the_config_its_sweeper_runs():
    source = inspect.getsource(Hydra.multirun)
    assert calls_in_order(source, r"callbacks\.on_multirun_start\(config=cfg\b",
                          r"instantiate_sweeper\(\s*config=cfg\b")
    assert source.count("cfg = ") == 1

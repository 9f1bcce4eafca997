"""`pytest` alone leaves out the slow, slurm and system tests; `-m system` or a system test's node id runs it
(tests/conftest.py: pytest_collection_modifyitems). Checked on the real suite's test_presets.py."""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, REPO

SYSTEM = "tests/test_presets.py::test_ddp_sim_runs_two_ranks"  # marked system
FAST = "tests/test_presets.py::test_ddp_sim_is_two_cpu_processes_with_the_projects_ddp"


def collected(*args: str) -> list[str]:
    """The node ids `pytest <args>` would run, over the tests folder (only test_presets.py imported)."""
    proc = subprocess.run([PYTHON, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.subprocess
def test_system_tests_run_only_when_asked_for():
    folder = ["tests", "--ignore-glob=tests/test_[!p]*.py", "--ignore-glob=tests/test_pre[!s]*.py", "-k", "ddp_sim"]
    assert collected(*folder) == [FAST]  # pytest alone: the system test is deselected
    assert collected(*folder, "-m", "system") == [SYSTEM]
    assert collected(SYSTEM) == [SYSTEM]  # its node id: run, not silently deselected

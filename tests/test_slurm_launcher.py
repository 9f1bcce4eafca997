"""allconv's SLURM launcher without a cluster: what it adds to each job's config goes through Hydra's own overrides
(the plugin's __call__ composes and runs the job), and the config a job gets from them (test_slurm.py runs jobs on
a real cluster)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf

from conftest import CONF
from hydra_plugins.allconv_launchers.slurm_launcher import JOB_LOGGING, SlurmLauncher, override_value


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra/launcher=submitit_slurm", "hydra.sweep.dir=/sw/eep",
                                                       *overrides], return_hydra_config=True)


def launcher(*overrides: str) -> SlurmLauncher:
    cfg = composed(*overrides)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    params.pop("_target_")
    slurm = SlurmLauncher(**params)
    slurm.setup(hydra_context=None, task_function=None, config=cfg)
    return slurm


@pytest.fixture
def no_cache_env(monkeypatch):
    monkeypatch.delenv("ALLCONV_CACHE", raising=False)


@pytest.mark.parametrize("job_logging", ["disabled", "default"])
def test_a_job_s_log_config_is_the_merge_of_its_own_and_the_cluster_s(job_logging, no_cache_env):
    extra = launcher().cluster_job_overrides()
    job = composed(f"hydra/job_logging={job_logging}", *extra)
    own = composed(f"hydra/job_logging={job_logging}").hydra.job_logging
    merged = OmegaConf.merge(OmegaConf.to_container(own), JOB_LOGGING)  # what a job's config held before
    assert OmegaConf.to_container(job.hydra.job_logging) == OmegaConf.to_container(merged)
    assert set(job.hydra.job_logging.loggers) == {"submitit", "lightning.pytorch"}  # a dotted name stays one key


def test_the_zca_cache_is_in_the_sweep_folder_unless_one_is_named(monkeypatch, no_cache_env):
    job = composed(*launcher().cluster_job_overrides())
    assert job.hydra.job.env_set.ALLCONV_CACHE == "/sw/eep/.zca-cache"
    named = "+hydra.job.env_set.ALLCONV_CACHE=/mine"
    assert composed(named, *launcher(named).cluster_job_overrides()).hydra.job.env_set.ALLCONV_CACHE == "/mine"
    monkeypatch.setenv("ALLCONV_CACHE", "/from/env")  # the job process inherits it: nothing to add
    assert "ALLCONV_CACHE" not in composed(*launcher().cluster_job_overrides()).hydra.job.env_set


def test_the_plugin_runs_the_job_with_the_cluster_s_overrides_added(monkeypatch, no_cache_env):
    seen = []
    # The plugin's class this launcher derives from (Hydra's plugin scan may have executed the plugin's module anew
    # since, so not necessarily the module's current attribute).
    plugin = next(c for c in SlurmLauncher.__mro__[1:] if "__call__" in vars(c))
    assert plugin.__module__ == submitit_launcher.__name__
    monkeypatch.setattr(plugin, "__call__", lambda self, *args: seen.append(args) or "ran")
    slurm = launcher()
    assert slurm(["seed=3"], "hydra.sweep.dir", 4, "job_id_for_4", {}) == "ran"
    (overrides, key, num, job_id, state), = seen
    assert overrides == ["seed=3", *slurm.cluster_job_overrides()]
    assert (key, num, job_id, state) == ("hydra.sweep.dir", 4, "job_id_for_4", {})


@pytest.mark.parametrize("text", ["plain", "it's", "back\\slash", "a\\'b", "end\\", "[%(name)s] - x,y:z {}"])
def test_override_values_compose_back_to_the_same_string(text):
    assert composed(f"++hydra.job.env_set.X={override_value(text)}").hydra.job.env_set.X == text


@pytest.mark.parametrize("name", ["lightning", "hydra-core", "hydra-submitit-launcher", "submitit"])
def test_libraries_whose_behaviour_is_relied_on_are_pinned_to_the_tested_range(name):
    """pyproject.toml bounds each from above, and the installed version (the one these tests ran) is inside."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    from conftest import REPO

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pinned = {Requirement(d).name: Requirement(d).specifier
              for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert any(s.operator in ("<", "<=", "==", "~=") for s in pinned[name]), f"{name}: no upper bound"
    assert version(name) in pinned[name], (name, version(name), str(pinned[name]))

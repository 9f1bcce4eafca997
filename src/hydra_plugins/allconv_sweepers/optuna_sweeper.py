"""hydra/sweeper=optuna (conf/hparams_search/*.yaml): an Optuna study on Optuna's ask-and-tell API whose trials
are ordinary jobs of the sweep, each in its own run folder (docs/hparams_search.md).

Trial number N is Hydra job number N, so a trial's folder is the same in every launch. The study is
<sweep dir>/optuna.db: a relaunch loads it, runs again each trial a kill left RUNNING (same parameters, same job
number: its folder's checkpoints/last.ckpt is continued by the job, as in any relaunched sweep) and asks for new
trials until the study holds hydra.sweeper.n_trials finished ones (COMPLETE, FAIL or PRUNED). One sweep at a time
per folder (a lock on it). A job that fails is a FAIL trial; the sweep then ends with exit status 1 naming it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from allconv import optuna_search as search
from allconv.errors import AllConvError, ConfigError


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _dotted(node, prefix: str = "") -> dict[str, str]:
    """params as dotted keys: the preset writes `optim.lr: ...`, the command line's
    hydra.sweeper.params.optim.lr=... arrives nested; the later wins, as overrides do."""
    out: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, (dict, DictConfig)):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class OptunaSweeper(Sweeper):
    def __init__(self, study_name: str = "allconv", objective: str = "test_error", n_trials: int = 20,
                 n_jobs: int = 1, sampler: str = "tpe", seed: int | None = 0, sampler_kwargs: Any = None,
                 params: Any = None) -> None:
        self.study_name, self.objective, self.n_trials, self.n_jobs = study_name, objective, n_trials, n_jobs
        self.sampler_name, self.seed = sampler, seed
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.params = _dotted(params or {})
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # -- before anything is written ----------------------------------------------------------------------
    def _settings(self) -> None:
        for key, value, low in (("n_trials", self.n_trials, 1), ("n_jobs", self.n_jobs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"hydra.sweeper.{key}={value!r} is not allowed; give an integer >= {low}")
        if self.objective not in search.OBJECTIVES:
            raise ConfigError(f"hydra.sweeper.objective={self.objective!r} is not allowed; allowed: "
                              f"{', '.join(search.OBJECTIVES)}")
        if not isinstance(self.study_name, str) or not self.study_name:
            raise ConfigError(f"hydra.sweeper.study_name={self.study_name!r}: give a name")
        search.sampler(self.sampler_name, self.seed, self.sampler_kwargs)  # an unknown one is refused here

    def _space(self, arguments: list[str]) -> tuple[dict, list[str]]:
        """The searched keys -> distributions, and the fixed overrides every trial gets."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space, fixed = {}, []
        for o in overrides:
            if o.is_sweep_override():
                space[o.get_key_element()] = search.distribution(o)
            else:
                fixed.append(f"{o.get_key_element()}={o.get_value_element_as_str()}")
        if not space:
            raise ConfigError("hydra.sweeper.params searches nothing; give e.g. "
                              "hydra.sweeper.params.optim.lr='tag(log, interval(0.001, 0.3))'")
        return space, fixed

    def _preflight(self, space: dict, fixed: list[str]) -> None:
        """The jobs at both ends of the space, composed as the launcher will and checked as the pre-flight checks
        a grid's jobs (conf/train.yaml: hydra.callbacks.preflight); a key that does not exist fails here."""
        from hydra.utils import get_class, get_method

        from allconv.schema import validate

        pre = OmegaConf.select(self.config, "hydra.callbacks.preflight")
        self.settings = None
        for point in search.bounds(space):
            job = self.hydra_context.config_loader.load_sweep_config(
                self.config, fixed + [search.as_override(k, v) for k, v in point.items()])
            if pre is not None:
                validate(job, get_class(pre.schema))
                get_method(pre.check)(job)
            if self.settings is None:  # what every trial shares: the study's settings (_same_study)
                from allconv.run_folder import settings

                self.settings = {k: v for k, v in settings(job).items() if k not in space}
            if self.objective == "val_error" and not OmegaConf.select(job, "data.val_size"):
                raise ConfigError("hydra.sweeper.objective=val_error needs a validation split: set data.val_size > 0 "
                                  "(or objective=test_error)")

    # -- the sweep -------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        from allconv.cli import _one_line

        try:
            self._settings()
            space, fixed = self._space(arguments)
            self._preflight(space, fixed)
            sweep = Path(str(self.config.hydra.sweep.dir))
            search.check_folder(sweep)
        except AllConvError as e:
            _fail(str(e), 2)
        except Exception as e:  # Hydra's and OmegaConf's composition errors: one line too
            _fail(_one_line(e), 2)
        sweep.mkdir(parents=True, exist_ok=True)
        fd = os.open(sweep, os.O_RDONLY | os.O_DIRECTORY)  # held until the process ends: one sweep per study
        try:
            from allconv.files import lock

            lock(fd, sweep, blocking=False, guards=search.LOCK_GUARDS)
        except BlockingIOError:
            _fail(f"{sweep} is being swept by another process (its Optuna study is in use); wait for it to end", 2)
        try:
            study = search.open_study(sweep, self.study_name)
            self._same_study(study, space)
            study.sampler = search.sampler(self.sampler_name, self._seed(study), self.sampler_kwargs)
        except AllConvError as e:
            _fail(str(e), 2)
        from allconv.files import write_atomic

        write_atomic(sweep / "multirun.yaml", OmegaConf.to_yaml(self.config).encode())
        return self._run(study, space, fixed, sweep)

    def _seed(self, study) -> int | None:
        """A relaunch's sampler must not draw the first launch's points again: its seed moves on by the trials
        the study already holds."""
        return None if self.seed is None else int(self.seed) + len(study.get_trials(deepcopy=False))

    def _same_study(self, study, space: dict) -> None:
        """A relaunch searches the space and minimises the objective the study was started with, and its trials
        share the study's settings by the rule a continued run follows (run_folder.differences: only where the data
        lives, how a run is watched; trainer.max_epochs too must be equal), so its values stay comparable."""
        from allconv.run_folder import differences

        mine = {"space": search.space_json(space), "objective": self.objective,
                "settings": json.dumps(self.settings, sort_keys=True, default=str)}
        held = study.user_attrs
        if not held:
            for k, v in mine.items():
                study.set_user_attr(k, v)
            return
        where = f"the study {self.study_name!r} in {self.config.hydra.sweep.dir}"
        for key in ("space", "objective"):
            if held.get(key) != mine[key]:
                raise ConfigError(f"{where} was started with {key} {held.get(key)}, this launch gives {mine[key]}; "
                                  f"relaunch it with its own, or choose another hydra.sweep.dir")
        try:
            recorded = json.loads(held.get("settings", "{}"))
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            raise ConfigError(f"{where} holds no readable settings; choose another hydra.sweep.dir")
        diff = differences(recorded, json.loads(mine["settings"]), extend=False)
        if diff:
            raise ConfigError(f"{where} was started with other settings ({'; '.join(diff[:3])}); its trials share "
                              f"them: relaunch it with its own, or choose another hydra.sweep.dir")

    def _run(self, study, space: dict, fixed: list[str], sweep: Path) -> list:
        from optuna.trial import TrialState

        finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        returns, failed = [], []
        # Trials a kill left RUNNING: again, with their own parameters and number (their folder's last.ckpt).
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in [t for t in stale if set(t.params) != set(space)]:  # killed between ask() and its parameters
            study.tell(t.number, state=TrialState.FAIL)
            print(f"optuna: trial {t.number} was stopped before its parameters were drawn; marked FAIL",
                  file=sys.stderr, flush=True)
        stale = [t for t in stale if set(t.params) == set(space)]
        if stale:
            print(f"optuna: continuing {len(stale)} interrupted trial(s): "
                  f"{', '.join(str(t.number) for t in stale)}", file=sys.stderr, flush=True)
        for i in range(0, len(stale), self.n_jobs):
            batch = [(t.number, t.params) for t in stale[i:i + self.n_jobs]]
            returns += self._launch(study, batch, fixed, failed)
        while True:
            done = len(study.get_trials(deepcopy=False, states=finished))
            want = min(self.n_jobs, self.n_trials - done)
            if want <= 0:
                break
            trials = [study.ask(space) for _ in range(want)]
            returns += self._launch(study, [(t.number, t.params) for t in trials], fixed, failed)
        self._summary(study, sweep)
        if failed:
            ran = len(returns)
            _fail(f"{len(failed)} of {ran} trials failed: {'; '.join(failed[:5])}{'; ...' if len(failed) > 5 else ''} "
                  f"(each folder's metrics.json says why; the study holds them as FAIL)", 1)
        return [returns]

    def _launch(self, study, batch: list[tuple[int, dict]], fixed: list[str], failed: list[str]) -> list:
        """Jobs numbered as their trials (consecutive numbers go to the launcher together), each result told."""
        from optuna.trial import TrialState

        out: list[JobReturn] = []
        groups: list[list[tuple[int, dict]]] = []
        for item in batch:
            if groups and groups[-1][-1][0] + 1 == item[0]:
                groups[-1].append(item)
            else:
                groups.append([item])
        for group in groups:
            jobs = [fixed + [search.as_override(k, v) for k, v in params.items()] for _, params in group]
            results = self.launcher.launch(jobs, initial_job_idx=group[0][0])
            for (number, params), r in zip(group, results, strict=True):
                value, why = self._value(r)
                shown = " ".join(search.as_override(k, v) for k, v in params.items())
                if value is None:
                    study.tell(number, state=TrialState.FAIL)
                    failed.append(f"job {number} ({self._folder(r)}): {why}")
                    print(f"optuna: trial {number} ({shown}) failed: {why}", file=sys.stderr, flush=True)
                else:
                    study.tell(number, value)
                    print(f"optuna: trial {number} ({shown}) {self.objective} {value:.4f}", file=sys.stderr,
                          flush=True)
            out += results
        return out

    @staticmethod
    def _folder(r: JobReturn) -> str:
        out = OmegaConf.select(r.hydra_cfg, "hydra.runtime.output_dir") if r.hydra_cfg is not None else None
        return Path(str(out)).name if out else "no folder"

    def _value(self, r: JobReturn) -> tuple[float | None, str]:
        """The objective from the trial's metrics.json (the job's own record), or None and why not."""
        from allconv import run_record
        from allconv.run_folder import RunFolder

        if r.status != JobStatus.COMPLETED:
            try:
                _ = r.return_value  # a failed job's return_value raises what the job raised
            except Exception as e:
                return None, f"{type(e).__name__}: {e}"
            return None, f"job {r.status.name.lower()}"
        out = OmegaConf.select(r.hydra_cfg, "hydra.runtime.output_dir") if r.hydra_cfg is not None else None
        try:
            metrics = RunFolder(str(out)).outcome() if out else None
        except AllConvError as e:
            return None, str(e)
        if not isinstance(metrics, dict):
            return None, "no metrics.json"
        if run_record.status_of(metrics) != run_record.FINISHED:
            return None, str(metrics.get("error") or f"status {metrics.get('status')}")[:200]
        value = metrics.get(self.objective)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, f"metrics.json has no finite {self.objective} ({value!r})"
        return float(value), ""

    def _summary(self, study, sweep: Path) -> None:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return
        try:
            search.plot(study, self.objective, sweep / search.PLOT)
        except (OSError, AllConvError) as e:
            print(f"warning: cannot write {sweep / search.PLOT}: {e}", file=sys.stderr, flush=True)
        best = study.best_trial
        shown = " ".join(search.as_override(k, v) for k, v in best.params.items())
        print(f"optuna: best of {len(complete)} complete trials: trial {best.number} ({shown}) {self.objective} "
              f"{best.value:.4f}; {sweep / search.PLOT}", flush=True)

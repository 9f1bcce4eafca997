"""What the entry points in src/ share: the pre-flight check inside Hydra, the config tree, one-line errors.

Preflight is a Hydra callback (conf/train.yaml, eval.yaml, visualize.yaml: hydra.callbacks). It checks
the composed config of the run, or of every job of a multirun, against its schema (allconv.schema),
then runs a check function on it, before Hydra creates a run folder: a bad value, a missing file or an
unwritable output folder ends with one line on stderr and exit status 2, and nothing is written.
Later failures come through run(): an AllConvError is one line and its exit status; in a multirun the
job is recorded in its metrics.json and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from allconv import run_folder, run_record, sweep_folder
from allconv.errors import AllConvError, ConfigError, Interrupted, NonFiniteLossError, ResumeError, RunFolderError
from allconv.files import check_output_dir
from allconv.run_folder import RunFolder

# Lightning's advice that does not apply here (tiny smoke runs, an intentionally absent val loop), and Hydra's note
# that conf/hydra/launcher/submitit_slurm.yaml, which takes the plugin's name on purpose (the documented command
# gets allconv's launcher), is checked against the plugin's schema.
IGNORED_WARNINGS = (
    ".*LeafSpec.*", ".*log_every_n_steps.*", ".*Total length of .* across ranks is zero.*",
    ".*does not have many workers.*", ".*exists and is not empty.*", ".*is not supported by the model summary.*",
    ".*The `srun` command is available on your system but is not used.*",  # jobs go through submitit
    r"(?s).*is validated against ConfigStore schema with the same name",
)


def setup() -> None:
    """What a process needs before it composes or runs an allconv job; importing allconv changes nothing.

    Called first by each entry point in src/ (so also by the DDP ranks they start) and by a launcher's worker
    process when it unpickles the pre-flight callback (Preflight.__setstate__). Calling it again changes nothing.
    """
    sweep_folder.register_resolver()  # ${allconv.job_folder:...}: a relaunched job's folder, found by identity
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """argparse reports a bad argument with its usage (several lines); here it is one line, exit status 2.

    The parser belongs to the command's main(); its error() is the one place argparse reports from.
    """
    import argparse

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = lambda parser, message: fail(f"{message} (see {parser.prog} --help)", 2)
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


# Lightning settings this project replaces by its own: named in the refusal of the Lightning key.
INSTEAD = {
    "trainer.gradient_clip_val": "this project caps each update instead: optim.max_update_norm=<cap> (lr * |g| <= cap, "
                                 "the global L2 norm; optim.max_update_norm=null: plain SGD)",
}
INSTEAD["trainer.gradient_clip_algorithm"] = INSTEAD["trainer.gradient_clip_val"]


def _declared_keys() -> set[str]:
    """The keys a config schema declares (allconv.schema): `+key=value` on one composes and is then checked there."""
    from allconv import schema

    return set().union(*(schema.declared(s) for s in (schema.TrainConfig, schema.EvalConfig, schema.VisualizeConfig)))


def _not_declared(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(_declared_keys()), n=1, cutoff=0.8)
    return f"not a setting of allconv{f'; did you mean {close[0]}?' if close else ''}"


def _quoted(pattern: str, text: str) -> str:
    import re

    found = re.search(pattern, text)
    return found.group(1) if found else ""


def _one_line(e: Exception) -> str:
    from hydra.errors import MissingConfigException

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        return f"{first}; allowed: {', '.join(sorted(o for o in e.options if not o.startswith('_')))}"
    if "Could not append" in first:  # +key=value on a key the config already has
        key = _quoted(r"already at '([^']+)'", first)
        if key:
            return f"+{key}: {key} is already a setting, so + cannot add it; set it without the +: {key}=<value>"
    if "Could not override" in first or "Could not append" in first:
        key = _quoted(r"override '([^']+)'", first)
        if key in INSTEAD:
            return f"{key}: not a setting of allconv; {INSTEAD[key]}"
        cause = str(e.__cause__).strip().splitlines()[0] if e.__cause__ and str(e.__cause__).strip() else ""
        hint = f"add it with +{key}=<value>" if key and key in _declared_keys() else _not_declared(key)
        return f"{first.rstrip('.')}: {cause or 'no such key'} ({hint})"
    return first


def instead(message: str) -> str:
    """A schema's refusal of a Lightning key this project replaces, with what to use instead."""
    key = message.split("=", 1)[0]
    return f"{message.split(';', 1)[0]}; {INSTEAD[key]}" if key in INSTEAD and "unknown key" in message else message


def main(hydra_main: Callable[[], object]) -> None:
    """Run a hydra.main entry point; a config that does not compose is one line and exit status 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise instead of printing its own multi-line report, so the
    composition error reaches this one handler; errors of a job are handled by the job (train_job, run).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        fail(_one_line(e), 2)


def job_configs(config: DictConfig) -> Iterator[DictConfig] | None:
    """The composed config of every job of a multirun, as the launcher will compose it.

    The sweep is read with Hydra's own override parser (the grammar, glob() included) and each job
    composed by Hydra's config loader (load_sweep_config, what launchers call); the jobs are the
    cartesian product of the sweeps, the basic sweeper's rule. None for a sweeper that picks values
    as it goes (an interval sweep): those jobs are checked when they start.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    axes: dict[str, list[str]] = {}
    for o in OverridesParser.create(config_loader=loader).parse_overrides(args):
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            if not axes[key]:
                raise ConfigError(f"{key}: the sweep matches no value; give at least one")
        else:
            return None
    return (loader.load_sweep_config(config, list(combo)) for combo in itertools.product(*axes.values()))


class Preflight(Callback):
    """Before any run folder exists: the job config against `schema` (allconv.schema), then `check` on it.

    schema and check are dotted names: a model of allconv.schema and a function taking the job config.
    """

    def __init__(self, check: str, schema: str, output_key: str | None = "hydra.run.dir",
                 run_folders: bool = False) -> None:
        from hydra.utils import get_class, get_method

        self.check: Callable[[DictConfig], None] = get_method(check)
        self.schema = get_class(schema)
        self.output_key = output_key
        self.run_folders = run_folders  # train: a folder that holds a run is continued or refused (run_folder)
        self.folders: dict[int, Path] | None = None  # the jobs' folders of this launch (multirun)
        self.sweep: Path | None = None

    def __setstate__(self, state: dict) -> None:
        """A launcher's worker process (joblib, submitit) unpickles this before it composes and runs its jobs."""
        self.__dict__.update(state)
        setup()

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except AllConvError as e:
            fail(instead(str(e)), 2)
        except Exception as e:  # composition errors of Hydra and OmegaConf become one line too
            fail(_one_line(e), 2)

    def _check(self, job: DictConfig) -> None:
        from allconv.schema import validate

        validate(job, self.schema)
        self.check(job)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        def run() -> None:
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(config)  # as Hydra does next: ${hydra:...} in any value resolves
            from allconv.schema import validate

            validate(config, self.schema)
            if self.run_folders:  # first what the folder allows, then the checkpoint and data it would continue with
                run_folder.check_single_run(config)
            self.check(config)
            if self.output_key and OmegaConf.select(config, self.output_key) is not None:
                check_output_dir(OmegaConf.select(config, self.output_key), self.output_key)

        self._guarded(run)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        def run() -> None:
            jobs = job_configs(config)
            checked = []
            for num, job in enumerate(jobs or ()):
                self._check(job)
                checked.append((num, job))
            check_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
            if self.run_folders and jobs is not None:
                self.sweep = Path(str(config.hydra.sweep.dir))
                self.folders = sweep_folder.plan(config, checked)

        self._guarded(run)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """A sweep in which a job failed ran the others; it then ends non-zero, naming the failed jobs."""
        if self.sweep is None:
            return
        sweep_folder.release(self.sweep)
        failed = sweep_folder.failed_jobs(self.sweep, self.folders or {})
        if failed:
            fail(f"{len(failed)} of {len(self.folders)} jobs failed: {'; '.join(failed[:5])}"
                 f"{'; ...' if len(failed) > 5 else ''} (each folder's metrics.json says why)", 1)


def run(fn: Callable[[], object]) -> object:
    """Call fn; an AllConvError becomes its one line and exit status."""
    try:
        return fn()
    except AllConvError as e:
        fail(str(e), e.exit_code)


def print_config_tree(cfg: DictConfig, fields=("model", "data", "optim", "trainer", "logger", "callbacks")) -> None:
    """The composed config as a rich tree, one branch per group (as lightning-hydra-template does)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    for field in list(fields) + [k for k in cfg if k not in fields]:
        if field not in cfg:
            continue
        value = cfg[field]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(rich.tree.Tree(f"[bold]{field}")).add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def run_dir() -> Path:
    """The job's folder as Hydra made it. Read unresolved: Hydra stores the path it computed as a plain string, so a
    folder named `run${oc.env:X}` is that name, never what the interpolation would give."""
    from hydra.core.hydra_config import HydraConfig

    return Path(OmegaConf.to_container(HydraConfig.get().runtime, resolve=False)["output_dir"])


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def train_job(cfg: DictConfig) -> float | None:
    """One training job. A multirun job continues its own run (a relaunch, a requeue) or skips a finished one."""
    from hydra.core.hydra_config import HydraConfig

    from allconv import training
    from allconv.callbacks import interrupted_as_error

    if cfg.print_config:
        print_config_tree(cfg)
    folder = RunFolder(run_dir())
    sweep = Path(HydraConfig.get().sweep.dir) if is_multirun() else None
    try:
        folder.hold()  # a second process training this run is refused before it writes anything
        folder.check_links()  # again here: a requeued job was not checked by a pre-flight
        if sweep is not None:
            sweep_folder.check_job_folder(folder, sweep)
            run_folder.check_job(folder, cfg)
            plan = sweep_folder.plan_job(folder)
            if plan.note:
                print(plan.note, file=sys.stderr, flush=True)
            if plan.action == "skip":
                error = plan.metrics.get("test_error")
                return error if isinstance(error, float) else None
            if plan.action == "resume":
                cfg.ckpt_path = plan.ckpt_path
        with interrupted_as_error():  # Lightning's SIGTERMException (exit 0) -> Interrupted (exit 128+signum)
            metrics = training.train(cfg, folder.path)
    except Exception as e:
        return job_failed(e, cfg, folder, sweep)
    finally:
        folder.release()
    if metrics.get("status") != "checked":  # fast_dev_run records nothing (training.train says so)
        print(f"test error {metrics['test_error']:.4f}  ->  {folder.metrics}")
    return metrics["test_error"]


def job_failed(e: Exception, cfg: DictConfig, folder: RunFolder, sweep: Path | None) -> None:
    """The one failure policy of a training job: how it ended goes into its own record (never into a folder that
    is not yet, or not, this run's: then, in a sweep, into a note beside it), then one line and its exit status;
    a sweep goes on with its other jobs unless a signal stopped the process."""
    from allconv import models

    known = isinstance(e, AllConvError)
    status = run_record.INTERRUPTED if isinstance(e, Interrupted) else \
        run_record.DIVERGED if isinstance(e, NonFiniteLossError) else run_record.FAILED
    message = str(e) if known else f"{type(e).__name__}: {_one_line(e)}"
    ours = not isinstance(e, (RunFolderError, ResumeError)) and os.path.isfile(folder.identity)
    try:
        if ours:
            folder.write_outcome({"status": status, "error": message, "lr": cfg.optim.lr, "seed": cfg.seed,
                                  "model": models.config_name(cfg.model.family, cfg.model.variant)})
        elif sweep is not None:
            from allconv.files import write_atomic

            write_atomic(sweep_folder.refusal_note(sweep, _job_num()), (message + "\n").encode())
    except OSError:
        pass  # the folder itself is what failed; the line below says why
    if sweep is not None and status != run_record.INTERRUPTED:  # the sweep goes on; the report lists the run
        if not known:
            import traceback

            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return None
    if not known:
        raise e
    fail(message, e.exit_code)  # a signal stops a sweep too: the scheduler asked the whole process to stop


def _job_num() -> int:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.num

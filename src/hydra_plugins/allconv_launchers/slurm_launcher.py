"""hydra/launcher=slurm_cpu | slurm_gpu: hydra-submitit-launcher's SLURM launcher, with refusals and preemption
made explicit. It lives here because Hydra instantiates launchers only from the hydra_plugins namespace; the
helpers it uses are allconv.local_parallel'.
"""

from __future__ import annotations

import os
import re
import sys

from hydra_plugins.hydra_submitit_launcher import submitit_launcher


def submitit_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit (--signal=USR2@<delay>; env-configurable)."""
    import signal

    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


# sbatch's refusals -> the hydra.launcher key that asked for it (the first match names the key to change)
_REFUSALS = (
    ("generic resource", "hydra.launcher.gpus_per_node (null on a partition without GPUs; or gres)"),
    ("partition", "hydra.launcher.partition (sinfo lists the partitions)"),
    ("time limit", "hydra.launcher.timeout_min (the partition's limit: sinfo -o '%P %l')"),
    ("memory", "hydra.launcher.mem_gb (the node's memory: sinfo -o '%P %m')"),
    ("account", "hydra.launcher.account"),
    ("qos", "hydra.launcher.qos"),
    ("node count", "hydra.launcher.nodes"),
    ("processors", "hydra.launcher.cpus_per_task or tasks_per_node (the node's cores: sinfo -o '%P %c')"),
    ("node configuration", "hydra.launcher.cpus_per_task, mem_gb, gpus_per_node or tasks_per_node "
                           "(the nodes have: sinfo -o '%P %c %m %G')"),
)


def refusal_message(sbatch_stderr: str) -> str:
    """sbatch's own error (its last 'error:' line) and the hydra.launcher key to change, as one line."""
    lines = [ln.strip() for ln in sbatch_stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["no message"]
    said = errors[-1]
    reason = said.split("error:", 1)[-1].strip() if "error:" in said else said
    key = next((k for pattern, k in _REFUSALS if pattern in reason.lower()), "the hydra.launcher.* resources")
    return f"sbatch refused the job: {reason}; change {key}"


class _SbatchErrors:
    """sys.stderr while jobs are submitted: sbatch's error text, which submitit prints before raising, is held
    back (it becomes part of the one error line); everything else goes straight through."""

    def __init__(self, real):
        self.real, self.held, self._swallow_newline = real, [], False

    def write(self, text: str) -> int:
        if text.startswith("sbatch: "):
            self.held.append(text)
            self._swallow_newline = True
            return len(text)
        if self._swallow_newline and text == "\n":
            self._swallow_newline = False
            return 1
        self._swallow_newline = False
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


def _job_dir(overrides) -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.output_dir)
    except Exception:  # the job failed before Hydra set its config
        return "its run folder"



# conf/train.yaml's job_logging=disabled keeps local runs quiet; a cluster job's log must say when it was
# signalled and requeued: submitit's and Lightning's own lines go to the job's .err file as well.
JOB_LOGGING = {
    "formatters": {"allconv_slurm": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"}},
    "handlers": {"allconv_slurm": {"class": "logging.StreamHandler", "formatter": "allconv_slurm",
                                   "stream": "ext://sys.stderr"}},
    "loggers": {name: {"level": "INFO", "handlers": ["allconv_slurm"], "propagate": False}
                for name in ("submitit", "lightning.pytorch")},
}


def override_value(value) -> str:
    """value (dicts, lists, strings, numbers, booleans) in Hydra's override grammar; a dict value merges into the
    config's dict, as OmegaConf.merge does."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # Quoted: a backslash is escaped only where a quote (or the closing quote) follows it, as the grammar reads it.
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), str(value)) + "'"


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher (conf/hydra/launcher/slurm_cpu.yaml, slurm_gpu.yaml) plus:

    - a submission sbatch refuses is one line naming sbatch's message and the hydra.launcher key to change,
      exit 2 (submitit prints sbatch's text and raises a multi-line FailedJobError);
    - inside a job, submitit's preemption signal (USR2, also sent `signal_delay_s` before the time limit) is
      first a preemption of the run: callbacks.Preemption stops it at the next step boundary and saves
      last.ckpt, train_job records it as interrupted and exits 128+USR2; only then is the signal handed to
      submitit's own handler, which resubmits the same job (checkpoint(): same overrides, same job number, so
      the same run folder) and requeues it. Without this, submitit's handler exits from inside a step and
      nothing is saved. The requeued job finds last.ckpt in its folder and continues (sweep_folder.plan_job);
    - a job started again by SLURM (scontrol requeue, or submitit's own requeue) says so in its log.

    SIGTERM (scontrol requeue, a preemption by SLURM, the time limit itself) needs no hand-over: SLURM has
    already requeued the job; the run saves and exits 143, and the requeued job continues the same way.
    """

    def launch(self, job_overrides, initial_job_idx):
        import shutil

        from submitit.core.utils import FailedJobError

        from allconv.cli import fail
        from allconv.errors import ConfigError

        if shutil.which("sbatch") is None:
            fail(str(ConfigError("hydra/launcher=slurm_*: sbatch is not on this machine's PATH; submit from a "
                                 "SLURM login node, or use hydra/launcher=submitit_local here")), 2)
        stderr = sys.stderr
        sys.stderr = held = _SbatchErrors(stderr)
        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as e:
            if not held.held:  # a job that failed on the cluster (its error pickle), not a refused submission
                raise
            sys.stderr = stderr  # sbatch refused the array: nothing was queued
            fail(str(ConfigError(refusal_message("".join(held.held) or str(e)))), 2)
        finally:
            sys.stderr = stderr

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        import signal

        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "?"))
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if restarts:
            print(f"slurm: job {job} (sweep job {job_num}) started again after a requeue ({restarts} so far)",
                  file=sys.stderr, flush=True)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():  # task/none binds nothing: torch would use every core of the node
            import torch

            torch.set_num_threads(int(cpus))
        preempt = submitit_signal()
        try:
            return super().__call__([*sweep_overrides, *self.cluster_job_overrides()], job_dir_key, job_num, job_id,
                                    singleton_state)
        except SystemExit as stop:
            if stop.code != 128 + preempt:  # not submitit's signal: SIGTERM's requeue is SLURM's own
                raise
            handler = signal.getsignal(preempt)  # submitit's, put back by Preemption once the run stopped
            if not callable(handler):
                raise
            print(f"slurm: job {job}: run saved; handing {signal.Signals(preempt).name} to submitit to requeue it",
                  file=sys.stderr, flush=True)
            from submitit.core.utils import UncompletedJobError

            try:
                handler(preempt, None)  # rank 0: resubmit and `scontrol requeue`, then exit; other ranks return
            except UncompletedJobError as e:  # timed out more than max_num_timeout times: the job ends here
                from hydra.core.utils import JobReturn, JobStatus

                print(f"error: slurm: job {job} not requeued ({e}); its run folder {_job_dir(sweep_overrides)} "
                      f"holds the checkpoint: relaunch the sweep with the same hydra.sweep.dir, or raise "
                      f"hydra.launcher.max_num_timeout", file=sys.stderr, flush=True)
                ret = JobReturn(overrides=list(sweep_overrides), status=JobStatus.COMPLETED)
                ret.return_value = None  # recorded as interrupted in its metrics.json; the sweep goes on
                return ret
            raise

    def cluster_job_overrides(self) -> list[str]:
        """Hydra overrides added to each job's own: what a cluster job needs in its config.

        Its log (JOB_LOGGING, merged into hydra.job_logging) and, unless $ALLCONV_CACHE or hydra.job.env_set names
        one, the ZCA cache in the sweep folder: a place every node of the sweep sees (submitit exchanges its pickles
        through it), so the whitening is fitted once (data.cache_dir, when set, wins over both).
        """
        overrides = [f"++hydra.job_logging={override_value(JOB_LOGGING)}"]
        if not os.environ.get("ALLCONV_CACHE") and "ALLCONV_CACHE" not in self.config.hydra.job.env_set:
            overrides.append("++hydra.job.env_set.ALLCONV_CACHE='${hydra.sweep.dir}/.zca-cache'")
        return overrides

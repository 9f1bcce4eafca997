"""allconv.schema: every key of the composed configs is declared, every preset validates, and a bad setting of
src/train.py, src/eval.py or src/visualize.py is one line naming the key, its value and what is allowed, exit
status 2, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from allconv import checks, cli, schema
from allconv.errors import ConfigError
from conftest import CONF, SRC, TINY, only_line, run_cli, write_npz

EVAL_PY, VISUALIZE_PY, REPORT_PY = SRC / "eval.py", SRC / "visualize.py", SRC / "report.py"
TRAINER_KEYS = ("max_epochs, accelerator, devices, num_nodes, strategy, precision, benchmark, deterministic, "
                "log_every_n_steps, check_val_every_n_epoch, fast_dev_run, limit_train_batches, limit_val_batches, "
                "limit_test_batches, enable_progress_bar, num_sanity_val_steps, max_steps, min_epochs, min_steps, "
                "max_time, accumulate_grad_batches, val_check_interval, overfit_batches, detect_anomaly, "
                "enable_model_summary, inference_mode, profiler")
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # torch sees no GPU, whatever this machine has

# (id, script, arguments, environment, the one line of stderr)
CASES = [
    ("gpu_without_gpu", None, ["trainer=gpu"], NO_GPU,
     "error: trainer.accelerator=gpu: this machine has no CUDA GPU; use trainer=cpu (or trainer.accelerator=auto)"),
    ("precision_name", None, ["trainer.precision=banana"], None,
     "error: trainer.precision=banana: must be one of: auto, transformer-engine, transformer-engine-float16, "
     "16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, 64, 32, 16, bf16"),
    ("unknown_trainer_key", None, ["+trainer.nope=1"], None,
     f"error: trainer.nope=1: unknown key; trainer has: {TRAINER_KEYS}"),
    ("limit_train_fraction", None, ["data.limit_train=1.5"], None,
     "error: data.limit_train=1.5: must be a whole number >= 1 (or null for all)"),
    ("limit_test_negative", None, ["data.limit_test=-500"], None,
     "error: data.limit_test=-500: must be a whole number >= 1 (or null for all)"),
    ("zca_filter_bias_zero", None, ["data.zca_filter_bias=0"], None,
     "error: data.zca_filter_bias=0: must be a positive number"),
    ("eval_batch_size_zero", None, ["data.eval_batch_size=0"], None,
     "error: data.eval_batch_size=0: must be a whole number >= 1"),
    ("nesterov_without_momentum", None, ["optim.nesterov=true", "optim.momentum=0"], None,
     "error: optim.nesterov=true: needs optim.momentum > 0 (torch's SGD has no Nesterov without momentum)"),
    ("interpolation_unresolved", None, ["optim.lr=${nope.nope}"], None,
     "error: optim.lr=${nope.nope}: the interpolation does not resolve (Interpolation key 'nope.nope' not found)"),
    ("ddp_spawn", None, ["trainer.strategy=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2"], None,
     "error: trainer.strategy=ddp_spawn: must be auto or ddp (several processes: trainer=ddp)"),
    ("devices_without_ddp", None, ["trainer.devices=2"], None,
     "error: trainer.devices=2: several devices run one process each: use trainer=ddp (or trainer.devices=1)"),
    ("pool_gain_not_bool", None, ["model.pool_gain=banana"], None,
     "error: model.pool_gain=banana: must be true or false"),
    ("final_weights_name", None, ["model.final_weights=foo"], None,
     "error: model.final_weights=foo: must be one of: zero, init"),
    ("unknown_top_key", None, ["+nope=1"], None,
     "error: nope=1: unknown key; the config has: seed, ckpt_path, print_config, model, data, optim, trainer, "
     "logger, callbacks, tags"),
    ("visualize_unknown_key", VISUALIZE_PY, ["ckpt_path=x.ckpt", "viz.nope=1"], None,
     "error: Could not override 'viz.nope': Key 'nope' is not in struct (not a setting of allconv)"),
    ("visualize_added_key", VISUALIZE_PY, ["ckpt_path=x.ckpt", "+viz.nope=1"], None,
     "error: viz.nope=1: unknown key; viz has: figure, layer, unit, method, top_k, channels, num_channels, "
     "num_images, batch_size"),
    ("visualize_top_k_zero", VISUALIZE_PY, ["ckpt_path=x.ckpt", "viz.top_k=0"], None,
     "error: viz.top_k=0: must be a whole number >= 1"),
    ("eval_unknown_key", EVAL_PY, ["ckpt_path=x.ckpt", "+nope=1"], None,
     "error: nope=1: unknown key; the config has: ckpt_path, data, trainer"),
    ("eval_unknown_trainer_key", EVAL_PY, ["ckpt_path=x.ckpt", "+trainer.nope=1"], None,
     f"error: trainer.nope=1: unknown key; trainer has: {TRAINER_KEYS}"),
    ("eval_limit_test_zero", EVAL_PY, ["ckpt_path=x.ckpt", "data.limit_test=0"], None,
     "error: data.limit_test=0: must be a whole number >= 1 (or null for the checkpoint's own)"),
]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# A real process for one case of each command and for the GPU case (CUDA_VISIBLE_DEVICES is read when torch
# starts); the rest run the same entry point in this process (run_entry), which takes a fraction of the time.
IN_A_PROCESS = {"gpu_without_gpu", "unknown_trainer_key", "visualize_added_key", "eval_unknown_key"}


@pytest.mark.parametrize("case_id,script,args,env,expected", [
    pytest.param(*c, marks=pytest.mark.subprocess) if c[0] in IN_A_PROCESS else c for c in CASES],
    ids=[c[0] for c in CASES])
def test_bad_setting_is_one_line_and_nothing_is_written(tmp_path, run_entry, case_id, script, args, env, expected):
    """Each rule refuses its value through the real command; without the rule the run would start (or fail later)."""
    run_dir = tmp_path / "run"
    if script is None:  # a run that would train in seconds if the rule let it through
        data = write_npz(tmp_path / "data.npz", n_train=32, n_test=16)
        tiny = [a for a in TINY if a != "trainer.accelerator=cpu"]  # a case picks its own trainer
        args = [*tiny, "logger=none", "data=npz", f"data.path={data}", "data.preprocess=standardize", *args]
    before = _tree(tmp_path)
    if case_id in IN_A_PROCESS:
        rc, out, err = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path, script=script or SRC / "train.py",
                               env=env)
    else:
        assert env is None
        rc, out, err = run_entry(*args, f"hydra.run.dir={run_dir}", script=script or SRC / "train.py")
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    assert only_line(err) == expected
    assert not run_dir.exists() and _tree(tmp_path) == before
    assert "test error" not in out


@pytest.mark.subprocess
@pytest.mark.parametrize("args, message", [
    (["--nope"], "error: the following arguments are required: dirs (see report.py --help)"),
    (["a_sweep", "--nope"], "error: unrecognized arguments: --nope (see report.py --help)"),
])
def test_report_usage_errors_are_one_line(tmp_path, args, message):
    rc, out, err = run_cli(*args, cwd=tmp_path, script=REPORT_PY)
    assert rc == 2 and only_line(err) == message and out == ""
    assert list(tmp_path.iterdir()) == []


# -- every composed config against the schema ----------------------------------------------------------------
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUP_CHOICES = [f"{g}={o}" for g in ("model", "data", "optim", "trainer", "logger", "callbacks") for o in _options(g)]


def _leaves(node, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node:
        return set().union(*(_leaves(v, f"{prefix}{k}.") for k, v in node.items()))
    return {prefix.rstrip(".")}


def _composed(config_name: str, *overrides: str, hydra: bool = False):
    from omegaconf import OmegaConf

    cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)
    return cfg, OmegaConf.to_container(cfg, resolve=False)


@pytest.fixture
def conf_dir():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def test_every_option_of_every_group_is_declared_and_validates(conf_dir):
    """A key added to conf/ without a rule in allconv.schema fails here, whichever option holds it."""
    assert len(GROUP_CHOICES) >= 12 + 3 + 4 + 3 + 1 + 1
    for config_name, model, choices in (("train", schema.TrainConfig, GROUP_CHOICES),
                                        ("eval", schema.EvalConfig, ["ckpt_path=x.ckpt"]),
                                        ("visualize", schema.VisualizeConfig, ["ckpt_path=x.ckpt"])):
        declared = schema.declared(model)
        for choice in choices:
            extra = ["data.path=x.npz"] if choice == "data=npz" else []  # its `???`, refused on its own below
            cfg, tree = _composed(config_name, choice, *extra)
            undeclared = _leaves(tree) - declared
            assert not undeclared, (config_name, choice, sorted(undeclared))
            schema.validate(cfg, model)
    with pytest.raises(ConfigError, match=r"^data\.path=\?\?\?: not set; must be an arrays \.npz file"):
        schema.validate(_composed("train", "data=npz")[0], schema.TrainConfig)


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_preset_and_each_of_its_jobs_validates(conf_dir, preset):
    cfg, tree = _composed("train", f"experiment={preset}", hydra=True)
    del tree["hydra"]
    assert not _leaves(tree) - schema.declared(schema.TrainConfig)
    jobs = list(cli.job_configs(cfg)) if str(cfg.hydra.mode) == "RunMode.MULTIRUN" else [cfg]
    assert jobs
    for job in jobs:
        schema.validate(job, schema.TrainConfig)


# -- rules whose messages the command-line cases above do not reach ---------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["optim.milestones=[3,2]"], "optim.milestones=[3, 2]: must be a list of increasing epochs >= 1"),
    (["trainer.devices=0"], "trainer.devices=0: must be auto, a number of devices >= 1 (-1: all) or a list of "
                            "device indices"),
    (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches=1.5: must be a whole number of batches >= 0 or "
                                        "a fraction in [0, 1] (or null for all)"),
    (["trainer.limit_test_batches=0"], "trainer.limit_test_batches=0: must be a whole number of batches >= 1 or "
                                       "a fraction in (0, 1], since the test error is the run's result "
                                       "(or null for all)"),
    (["seed=-1"], "seed=-1: must be a whole number in 0..4294967295"),
    (["~model.width"], "model.width is not set; must be a positive number"),
    (["logger.kind=foo"], "logger.kind=foo: must be one of: csv, none, wandb, tensorboard, many"),
    (["logger=csv", "+logger.project=x"], "logger.project=x: unknown key; logger has: kind"),
    (["logger=wandb", "logger.mode=x"], "logger.mode=x: must be one of: auto, online, offline, disabled"),
    (["model.width=inf"], "model.width=inf: must be a positive number"),
    (["trainer.num_nodes=2"], "trainer.num_nodes=2: several nodes need trainer=ddp"),
    (["data.translate=17"], "data.translate=17: must be a whole number in 0..16"),
])
def test_rule_messages(conf_dir, overrides, message):
    with pytest.raises(ConfigError) as e:
        schema.validate(_composed("train", *overrides)[0], schema.TrainConfig)
    assert str(e.value) == message


@pytest.mark.parametrize("overrides", [["trainer.precision=32"], ["trainer=ddp", "trainer.devices=4"],
                                       ["+trainer.max_steps=3", "optim.max_update_norm=null", "trainer.devices=[0]"]])
def test_settings_that_are_allowed(conf_dir, overrides):
    schema.validate(_composed("train", *overrides)[0], schema.TrainConfig)


@pytest.fixture
def two_gpus(monkeypatch):
    """What the pre-flight sees on a machine with 2 CUDA GPUs (no GPU is used: it refuses before Lightning)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("overrides, message", [
    (["trainer=gpu", "trainer.devices=4"], "trainer.devices=4: this machine has 2 CUDA GPUs"),
    (["trainer=gpu", "trainer.devices=[0,2]"], "trainer.devices=[0, 2]: this machine has 2 CUDA GPUs"),
    (["trainer.devices=auto"], "trainer.devices=auto: that is this machine's 2 GPUs, one process each: use trainer=ddp "
                               "(or trainer.devices=1)"),
])
def test_devices_against_the_machines_gpus(conf_dir, two_gpus, overrides, message):
    with pytest.raises(ConfigError) as e:
        checks.check_trainer(_composed("train", *overrides)[0])
    assert str(e.value) == message


def test_lightning_refusals_are_one_line(conf_dir, monkeypatch):
    """What the schema allows but Lightning refuses on this machine (its accelerator connector) is one line too."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        checks.check_trainer(_composed("train", "trainer.accelerator=mps")[0])
    assert str(e.value).startswith("trainer.accelerator=mps, trainer.devices=1, trainer.num_nodes=1, "
                                   "trainer.strategy=auto, trainer.precision=auto: ")
    assert "\n" not in str(e.value) and "MPSAccelerator" in str(e.value)


def test_a_slurm_sweep_is_not_checked_against_the_submitting_machine(conf_dir, monkeypatch):
    """Its jobs run on the cluster's GPU nodes: a login node without a GPU may submit trainer=gpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    here, _ = _composed("train", "trainer=gpu", hydra=True)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        checks.check_trainer(here)
    slurm, _ = _composed("train", "trainer=gpu", "hydra/launcher=slurm_gpu", hydra=True)
    checks.check_trainer(slurm)


def test_allowed_values_declared_here_match_their_modules():
    """schema sits below the run-setup layer, so it lists these itself; a value added there fails here."""
    from allconv import visualize_run, wandb_logger

    assert schema.FIGURES == visualize_run.FIGURES and schema.WANDB_MODES == wandb_logger.MODES

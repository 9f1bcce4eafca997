"""The configuration schema: every key of conf/train.yaml, eval.yaml and visualize.yaml, declared once.

Each key is a field of a pydantic model with its type and its range or allowed values. One declaration
gives the check, the allowed values and the message that names the key; a rule over several keys
(Nesterov needs momentum, several devices need the DDP strategy) sits on the model holding them. The
models forbid what they do not declare (extra="forbid"): a key added with +key=value that nothing
reads, or a Trainer argument Lightning does not take, is refused instead of silently ignored or failing
once training has started. Hydra's structured configs were not used: they give types only, with no
ranges, no allowed values beyond enums, no rules across keys, and their errors are multi-line reports.

validate(cfg, TrainConfig | EvalConfig | VisualizeConfig) checks a composed config, resolved and
without its hydra node, and raises a ConfigError whose message is one line: the full dotted key, the
bad value and what is allowed, e.g. `data.limit_train=1.5: must be a whole number >= 1 (or null for all)`.
"""

from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from allconv import models
from allconv.cifar_files import OFFICIAL, PREPROCESS
from allconv.errors import ConfigError
from allconv.lightning_private import precision_names
from allconv.schema_fields import (  # noqa: F401  (shown and declared: the schema's words, asked by others)
    Allowed,
    _allowed,
    _at,
    _field,
    broken,
    declared,
    describe,
    number,
    one_of,
    rule,
    shown,
    string,
    whole,
)
from allconv.visualize import METHODS

# -- the fields (allconv.schema_fields: the vocabulary of rules and the one-line messages) ---------------

Flag = rule(bool, "true or false")
Positive = number("a positive number", gt=0)
NonNegative = number("a number >= 0", ge=0)
Probability = number("a number in [0, 1)", ge=0, lt=1)
Finite = number("a finite number")
LayerName = rule(str | int, "a layer name: logits or a module name such as block2.down")
Batches = rule(Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
               "a whole number of batches >= 0 or a fraction in [0, 1]", null="all")
TestBatches = rule(Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)],
                   "a whole number of batches >= 1 or a fraction in (0, 1], since the test error is the run's result",
                   null="all")
SOURCES = (*OFFICIAL, "npz")
# Listed here, not imported: visualize_run and wandb_logger reach cli and experiment, which import this module.
FIGURES = ("reconstructions", "filters", "whitening")  # allconv.visualize_run draws these
WANDB_MODES = ("auto", "online", "offline", "disabled")  # allconv.wandb_logger.resolve_mode reads these
LOGGERS = ("csv", "wandb", "tensorboard")  # what logger=many combines (allconv.training.build_logger)
PROFILERS = ("simple", "advanced")  # Lightning's, built with the run folder as their dirpath (training.build_trainer)
PRECISIONS = ("auto", *precision_names())  # auto: bf16-mixed on CUDA, else 32-true (trainer_kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- conf/train.yaml ---------------------------------------------------------------------------------
class Model(Section):
    family: one_of(*models.FAMILIES)
    variant: one_of(*models.VARIANTS)
    width: Positive
    dropout_input: Probability
    dropout_pool: Probability
    final_relu: Flag
    init: one_of(*models.INITS)
    final_bias: Finite
    final_weights: one_of(*models.FINAL_WEIGHTS)
    pool_gain: Flag
    compile: Flag
    channels_last: Flag


class Data(Section):
    source: one_of(*SOURCES)
    num_classes: whole(2)
    path: string("an arrays .npz file", null="data=cifar10, cifar100") = None
    root: string("a folder")
    download: Flag
    verify_md5: Flag
    preprocess: one_of(*PREPROCESS)
    gcn_scale: Positive
    zca_filter_bias: Positive
    cache_dir: string("a folder", null="$ALLCONV_CACHE or ~/.cache/allconv")
    val_size: whole(0)
    split_seed: whole(0)
    augment: Flag
    translate: whole(0, 16)
    batch_size: whole(1)
    eval_batch_size: whole(1)
    on_device: Flag
    drop_last: Flag
    limit_train: whole(1, null="all")
    limit_test: whole(1, null="all")


class Optim(Section):
    lr: Positive
    momentum: Probability
    weight_decay: NonNegative
    nesterov: Flag
    milestones: rule(list[Annotated[int, Field(ge=1)]], "a list of increasing epochs >= 1")
    gamma: Positive
    max_update_norm: number("a positive number", null="no cap", gt=0)

    @model_validator(mode="after")
    def _rules(self):
        if self.milestones != sorted(self.milestones):
            raise broken("optim.milestones", self.milestones, "must be a list of increasing epochs >= 1")
        if self.nesterov and self.momentum == 0:
            raise broken("optim.nesterov", True,
                         "needs optim.momentum > 0 (torch's SGD has no Nesterov without momentum)")
        return self


class Trainer(Section):
    """Lightning's Trainer arguments that a run may set; a key left out is Lightning's default."""

    max_epochs: whole(1) = None
    accelerator: one_of("auto", "cpu", "gpu", "cuda", "mps") = None
    devices: rule(Literal["auto", -1] | Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=0)]],
                  "auto, a number of devices >= 1 (-1: all) or a list of device indices") = None
    num_nodes: whole(1) = None
    strategy: one_of("auto", "ddp", text="auto or ddp (several processes: trainer=ddp)") = None
    precision: one_of(*PRECISIONS) = None
    benchmark: rule(bool | Literal["auto"], "true, false or auto (true on CUDA)") = None
    deterministic: rule(bool | Literal["warn"], "true, false or warn") = None
    log_every_n_steps: whole(1) = None
    check_val_every_n_epoch: whole(1, null="validation every val_check_interval steps") = None
    fast_dev_run: rule(bool | Annotated[int, Field(ge=0)], "true, false or a whole number of batches") = None
    limit_train_batches: Batches = None
    limit_val_batches: Batches = None
    limit_test_batches: TestBatches = None
    enable_progress_bar: Flag = None
    num_sanity_val_steps: whole(-1) = None
    max_steps: whole(-1) = None
    min_epochs: whole(0, null="none") = None
    min_steps: whole(0, null="none") = None
    max_time: rule(Annotated[str, Field(pattern=r"^\d+:\d\d:\d\d:\d\d$")], "a duration DD:HH:MM:SS",
                   null="none") = None
    accumulate_grad_batches: whole(1) = None
    val_check_interval: rule(Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)],
                             "a whole number of steps >= 1 or a fraction of an epoch in (0, 1]", null="1.0") = None
    overfit_batches: Batches = None
    detect_anomaly: Flag = None
    enable_model_summary: Flag = None
    inference_mode: Flag = None
    profiler: one_of(*PROFILERS, null="none") = None


class Checkpoint(Section):
    every_n_epochs: whole(0)


class GuidedBackprop(Section):
    every_n_epochs: whole(0)
    num_images: whole(1)
    layer: LayerName
    unit: whole(0, null="the predicted class / strongest unit")
    filters: Flag


class EarlyStopping(Section):
    monitor: one_of("val/error")
    patience: whole(1)
    min_delta: number("a number >= 0", ge=0)


class Callbacks(Section):
    checkpoint: Checkpoint
    progress_bar: one_of("rich", "tqdm", "none")
    progress_bar_refresh: whole(1)
    guided_backprop: GuidedBackprop
    early_stopping: EarlyStopping = None  # absent unless callbacks=early_stopping (needs data.val_size > 0)


class CSVLogger(Section):
    kind: Literal["csv"]


class NoLogger(Section):
    kind: Literal["none"]


class WandbLogger(Section):
    kind: Literal["wandb"]
    project: rule(Annotated[str, Field(min_length=1)], "a W&B project name")
    entity: string("a W&B team or user", null="your default entity")
    mode: one_of(*WANDB_MODES)
    group: string("a W&B group name", null="<model>_lr<lr>")
    tags: rule(list[str], "a list of tags")
    log_model: Flag
    save_dir: string("a folder", null="the run directory")


class TensorBoardLogger(Section):
    kind: Literal["tensorboard"]


class ManyLoggers(WandbLogger):
    """logger=many: the loggers listed, with logger=wandb's settings for W&B (allconv.training.build_logger)."""

    kind: Literal["many"]
    loggers: rule(Annotated[list[Literal[LOGGERS]], Field(min_length=1)],
                  "a list of " + ", ".join(LOGGERS) + " (csv among them)")

    @model_validator(mode="after")
    def _rules(self):
        if "csv" not in self.loggers:  # what the run writes is what the list says
            raise broken("logger.loggers", self.loggers, "must include csv: the learning curve and the report "
                                                         "read csv/metrics.csv")
        return self


Logger = Annotated[CSVLogger | NoLogger | WandbLogger | TensorBoardLogger | ManyLoggers, Field(discriminator="kind")]


class TrainConfig(Section):
    """src/train.py: conf/train.yaml with its groups."""

    seed: whole(0, 2**32 - 1)  # Lightning's seed_everything range; outside it, it draws a seed of its own
    ckpt_path: string("a checkpoint file", null="a new run")
    print_config: Flag
    model: Model
    data: Data
    optim: Optim
    trainer: Trainer
    logger: Logger
    callbacks: Callbacks
    tags: rule(list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^,\s]+$")]],
               "a list of tags, each 1 to 64 characters, no comma or space") = []

    @model_validator(mode="after")
    def _rules(self):
        t = self.trainer
        several = (isinstance(t.devices, int) and t.devices > 1) or (isinstance(t.devices, list) and len(t.devices) > 1)
        if t.strategy in (None, "auto") and several:  # Lightning's own DDP would relaunch the whole command
            raise broken("trainer.devices", t.devices, "several devices run one process each: use trainer=ddp "
                                                       "(or trainer.devices=1)")
        if t.strategy in (None, "auto") and (t.num_nodes or 1) > 1:
            raise broken("trainer.num_nodes", t.num_nodes, "several nodes need trainer=ddp")
        return self


# -- conf/eval.yaml, conf/visualize.yaml -------------------------------------------------------------
KEEP = "the checkpoint's own"


class DataReplacement(Section):
    """The data keys that replace the checkpoint's own (null keeps them)."""

    source: one_of(*SOURCES, null=KEEP) = None
    path: string("an arrays .npz file", null=KEEP) = None
    root: string("a folder", null=KEEP) = None
    download: rule(bool, "true or false", null=KEEP) = None
    cache_dir: string("a folder", null=KEEP) = None
    limit_test: whole(1, null=KEEP) = None


class EvalConfig(Section):
    """src/eval.py: conf/eval.yaml. The checkpoint's trainer settings, with the keys given here replaced."""

    ckpt_path: string("a checkpoint file, <run dir>/checkpoints/last.ckpt")
    data: DataReplacement
    trainer: Trainer


class Viz(Section):
    figure: one_of(*FIGURES)
    layer: LayerName
    unit: whole(0, null="the predicted class / strongest unit")
    method: one_of(*METHODS)
    top_k: whole(1)
    channels: rule(list[Annotated[int, Field(ge=0)]], "a list of channel indices", null="the most active")
    num_channels: whole(1)
    num_images: whole(1)
    batch_size: whole(1)


class VisualizeConfig(Section):
    """src/visualize.py: conf/visualize.yaml."""

    ckpt_path: string("a checkpoint file, <run dir>/checkpoints/last.ckpt")
    out_dir: string("a folder", null="<run dir>/visualize/<figure>")
    device: one_of("auto", "cpu", "cuda")
    viz: Viz
    data: DataReplacement


# -- checking a composed config ----------------------------------------------------------------------
def validate(cfg: DictConfig, schema: type[BaseModel]) -> None:
    """Raise a one-line ConfigError for the first key of cfg (without hydra) that schema refuses."""
    try:
        data = plain(cfg)
    except MissingMandatoryValue as e:  # a `???` of the yaml that nothing set
        field = _field(schema, e.full_key)
        raise ConfigError(f"{e.full_key}=???: not set; must be {_allowed(field) if field else 'set'}") from None
    try:
        schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e.errors()[0], schema)) from None


def plain(cfg: DictConfig) -> dict:
    """cfg as plain values, interpolations resolved, without the hydra node."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        return OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue:
        raise
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        raw = _at(OmegaConf.to_container(job, resolve=False), key)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}={shown(raw)}: the interpolation does not resolve ({reason})") from None



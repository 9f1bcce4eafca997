"""Hydra plumbing shared by the scripts in src/: pre-flight checks, the config tree, one-line errors.

preflight() composes the command line's config before Hydra starts any job, so an unknown model,
a misspelt key or a bad value ends with one line on stderr and exit status 2, before a run
directory or a checkpoint is written. In a multirun, a job that fails later is recorded as failed
in its own metrics.json and the sweep goes on.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
INSPECT_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                 "--resolve"}
# Lightning's advice that does not apply here (tiny smoke runs, an intentionally absent val loop).
for _pattern in (".*LeafSpec.*", ".*log_every_n_steps.*", ".*Total length of .* across ranks is zero.*",
                 ".*does not have many workers.*", ".*exists and is not empty.*"):
    warnings.filterwarnings("ignore", message=_pattern)
VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--package", "-p",
               "--experimental-rerun"}


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _one_line(e: Exception) -> str:
    from hydra.errors import MissingConfigException

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        return f"{first}; allowed: {', '.join(sorted(o for o in e.options if not o.startswith('_')))}"
    cause = e.__cause__
    if "Could not override" in first or "Could not append" in first:
        detail = str(cause).splitlines()[0] if cause else ""
        return f"{first.rstrip('.')}: {detail or 'no such key'} (add a new key with +key=value)"
    return first


def _glob_options(o) -> list[str]:
    """The options of a config group that glob(...) selects (files under conf/<group>, not _private ones)."""
    group = CONF_DIR / o.key_or_group
    names = sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_")) if group.is_dir() else []
    return o.value().filter(names)


def _expand(overrides: list[str]) -> list[list[str]]:
    """Override lists to check: each sweep's elements one at a time, others at their first element."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parsed = OverridesParser.create().parse_overrides(overrides)
    base, sweeps = [], []
    for o in parsed:
        if o.is_hydra_override() if hasattr(o, "is_hydra_override") else o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            if o.is_discrete_sweep():
                values = _glob_options(o) if o.value_type == ValueType.GLOB_CHOICE_SWEEP else \
                    list(o.sweep_string_iterator())
                if not values:
                    raise ValueError(f"empty sweep for {o.key_or_group}: it matches no value; give at least one")
                sweeps.append([f"{o.get_key_element()}={v}" for v in values])
            continue  # interval sweeps: for optimising sweepers, every element is a number
        base.append(o.input_line)
    combos = [base + [s[0] for s in sweeps]]
    for i, s in enumerate(sweeps):
        for v in s[1:]:
            combos.append(base + [t[0] for t in sweeps[:i]] + [v] + [t[0] for t in sweeps[i + 1:]])
    return combos


def preflight(config_name: str, argv: list[str], check=None) -> None:
    """Compose and check the config(s) the command line asks for; exit 2 with one line if any is bad."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = argv[1:]
    if any(a in INSPECT_FLAGS or a.startswith("--cfg=") for a in args):
        return  # Hydra only prints something; nothing runs
    overrides, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in VALUE_FLAGS:
            skip = True
        elif not a.startswith("-"):
            overrides.append(a)
    try:
        combos = _expand(overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for combo in combos:
                cfg = compose(config_name=config_name, overrides=combo)
                if check is not None:
                    check(cfg)
    except SystemExit:
        raise
    except Exception as e:  # any composition or value error becomes one line
        GlobalHydra.instance().clear()
        fail(_one_line(e))
    GlobalHydra.instance().clear()


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
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def model_name(cfg: DictConfig) -> str:
    from allconv.models import config_name

    return config_name(cfg.model.family, cfg.model.variant)

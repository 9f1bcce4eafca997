"""Load a trained run from its checkpoint, one way, without running code.

eval, visualize and resume= all come through here. torch.load(weights_only=True) unpickles only
tensors and plain containers, so a crafted file cannot execute anything; the hyperparameters are
plain values (module.AllConvModule), so the network is rebuilt from the file alone. Anything that
is not such a checkpoint (crafted, truncated, corrupt, another project's, non-finite weights, a
saved value that is an interpolation) is one CheckpointError.

A checkpoint may come from elsewhere, so what it says is data, never settings: the network is
rebuilt from hyper_parameters.net and num_classes, and data_identity() names the test set it was
trained against (source, file, preprocessing and the split that reproduces the ZCA fit). How and
where a command runs (trainer, devices, output and cache folders, downloads) is never read from it.
A saved string holding `${` is refused rather than resolved: a run saves its config resolved, so
such a string was put there by hand, and resolving it would read the environment or other files.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from allconv.errors import CheckpointError
from allconv.module import AllConvModule

# The saved data keys that decide which images are tested and how they are preprocessed (the ZCA is fit
# on the training split, so the split and limits are part of it); everything else comes from the command.
DATA_IDENTITY = ("source", "path", "preprocess", "gcn_scale", "zca_filter_bias", "val_size", "split_seed",
                 "limit_train", "limit_test")

_KINDS = {"source": (str,), "path": (str,), "preprocess": (str,), "gcn_scale": (int, float),
          "zca_filter_bias": (int, float)}  # the other keys are integers
_OPTIONAL = {"path", "limit_train", "limit_test"}


def _interpolation(node, prefix: str = "") -> str | None:
    """The dotted key of the first string holding `${` in node, or None."""
    if isinstance(node, str):
        return (prefix or "<value>") if "${" in node else None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for k, v in items:
        found = _interpolation(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def _first_non_finite(state_dict: dict) -> str | None:
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            return str(name)
    return None


def read(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint as a dict of tensors and plain values; CheckpointError if it is not an allconv checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: objects that would run code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = first.split("Unsupported global:")[-1].strip() if "Unsupported global" in first else "unsafe pickle"
        raise CheckpointError(f"checkpoint {str(path)!r} holds objects that loading would have to execute "
                              f"({detail[:120]}); refused, nothing was run") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(e).__name__}); "
                              f"use an earlier checkpoint or start the run again") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not (isinstance(hp, dict) and isinstance(hp.get("net"), dict) and isinstance(ckpt.get("state_dict"), dict)):
        raise CheckpointError(f"checkpoint {str(path)!r} is not an allconv checkpoint "
                              f"(no state_dict or hyper_parameters.net)")
    key = _interpolation(hp)
    if key:
        raise CheckpointError(f"checkpoint {str(path)!r}: hyper_parameters.{key} is an interpolation (${{...}}); "
                              f"a saved config holds plain values only, refused unresolved")
    bad = _first_non_finite(ckpt["state_dict"])
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r}: state_dict tensor {bad!r} holds NaN or inf; "
                              f"the run diverged or the file was altered, use an earlier checkpoint")
    return ckpt


def config(ckpt: dict) -> DictConfig:
    """The run config saved in a checkpoint (what the run was composed from), for reading only."""
    try:
        return OmegaConf.create(ckpt["hyper_parameters"].get("config") or {})
    except Exception as e:  # a crafted config that OmegaConf cannot hold
        raise CheckpointError(f"checkpoint's hyper_parameters.config is not a config ({type(e).__name__})") from None


def data_identity(ckpt: dict, path: str | Path) -> dict:
    """The DataModule arguments of the checkpoint's test set: DATA_IDENTITY, num_classes and seed, as saved."""
    hp = ckpt["hyper_parameters"]
    cfg = hp.get("config")
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} does not say which data it was trained on "
                              f"(no hyper_parameters.config.data)")
    out = {k: data[k] for k in DATA_IDENTITY if k in data}
    out["num_classes"] = hp.get("num_classes", 10)
    if "seed" in cfg:
        out["seed"] = cfg["seed"]
    for k, v in out.items():
        kind = _KINDS.get(k, (int,))
        if (v is None and k in _OPTIONAL) or (isinstance(v, kind) and not isinstance(v, bool)):
            continue
        raise CheckpointError(f"checkpoint {str(path)!r}: saved data.{k}={v!r} is not a "
                              f"{' or '.join(t.__name__ for t in kind)}; refused")
    return out


def datamodule(ckpt: dict, path: str | Path, given: DictConfig | None = None):
    """The DataModule of the checkpoint's test set: data_identity(), then the non-null keys of `given`.

    Folders (root, cache_dir), downloads and batch sizes are never the checkpoint's: they are `given`'s
    or the DataModule's defaults.
    """
    from allconv.data import CIFARDataModule

    overrides = OmegaConf.to_container(given, resolve=True) if given is not None else {}
    return CIFARDataModule(**{**data_identity(ckpt, path), **{k: v for k, v in overrides.items() if v is not None}})


def module_from(ckpt: dict, path: str | Path) -> AllConvModule:
    """The trained network of a read() checkpoint, in eval mode, built from hyper_parameters.net and num_classes."""
    hp = ckpt["hyper_parameters"]

    def build() -> AllConvModule:
        return AllConvModule(dict(hp["net"]), num_classes=hp.get("num_classes", 10))  # eager, no compile

    try:
        # First on the meta device (no memory): a saved width or class count that does not fit the saved
        # tensors is refused before a network of that size is allocated.
        with torch.device("meta"):
            shapes = build().state_dict()
        saved = ckpt["state_dict"]
        for name, t in shapes.items():
            if name in saved and isinstance(saved[name], torch.Tensor) and saved[name].shape != t.shape:
                raise ValueError(f"hyper_parameters.net builds {name} of shape {tuple(t.shape)}, "
                                 f"the file holds {tuple(saved[name].shape)}")
        module = build()
        module.load_state_dict(saved)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own model "
                              f"({first[:160]})") from None
    return module.eval()


def load(path: str | Path, map_location="cpu") -> tuple[DictConfig, AllConvModule]:
    """(the run's config, the trained AllConvModule in eval mode) from a checkpoint file."""
    ckpt = read(path, map_location)
    return config(ckpt), module_from(ckpt, path)

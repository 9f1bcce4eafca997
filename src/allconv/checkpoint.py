"""Load a trained run from its checkpoint, one way, without running code.

eval, visualize and resume= all come through here. torch.load(weights_only=True) unpickles only
tensors and plain containers, so a crafted file cannot execute anything; the hyperparameters are
plain values (module.AllConvModule), so the network is rebuilt from the file alone. Anything that
is not such a checkpoint (crafted, truncated, corrupt, another project's, not a regular file, non-finite
weights, a weight that is not a dense tensor of the network's own dtype, values nested or shared beyond
what a checkpoint holds, a saved value that is an interpolation) is one CheckpointError.

A checkpoint may come from elsewhere, so what it says is data, never settings: the network is
rebuilt from hyper_parameters.net and num_classes, and data_identity() names the test set it was
trained against (source, file, preprocessing and the split that reproduces the ZCA fit). How and
where a command runs (trainer, devices, output and cache folders, downloads) is never read from it.
A saved string holding `${` is refused rather than resolved: a run saves its config resolved, so
such a string was put there by hand, and resolving it would read the environment or other files.
"""

from __future__ import annotations

import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from allconv.errors import CheckpointError
from allconv.files import file_kind, reason
from allconv.module import AllConvModule

# The saved data keys that decide which images are tested and how they are preprocessed (the ZCA is fit
# on the training split, so the split and limits are part of it); everything else comes from the command.
DATA_IDENTITY = ("source", "path", "preprocess", "gcn_scale", "zca_filter_bias", "val_size", "split_seed",
                 "limit_train", "limit_test")

_KINDS = {"source": (str,), "path": (str,), "preprocess": (str,), "gcn_scale": (int, float),
          "zca_filter_bias": (int, float)}  # the other keys are integers
_OPTIONAL = {"path", "limit_train", "limit_test"}


# The dtypes a run's weights are saved in: float32 (32-true and the mixed precisions), or 16-true, bf16-true, 64-true.
RUN_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}

# A run's checkpoint nests 7 levels deep (Lightning's loop state) and holds a few hundred values besides its
# tensors. Deeper or larger, a file would exhaust the recursion of whatever walks it next (OmegaConf, Lightning).
MAX_DEPTH = 32
MAX_VALUES = 100_000


def _children(node) -> list | None:
    """The values (and keys) inside a container, None for anything else (tensors and plain values)."""
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    return None


def _structure_fault(root) -> str | None:
    """Why root's containers cannot be walked recursively, or None: nested deeper than MAX_DEPTH, a container
    inside itself, or more than MAX_VALUES values once shared ones are counted at each place they appear.

    Iterative (the file chooses the depth), each container visited once (the file may share one many times)."""
    done: dict[int, tuple[int, int]] = {}  # id of a container walked -> (its levels, the values in it)
    path: set[int] = set()
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        inside = _children(node)
        if inside is None or (not finished and id(node) in done):
            continue
        if finished:
            path.discard(id(node))
            sub = [done.get(id(c), (0, 1)) if _children(c) is not None else (0, 1) for c in inside]
            done[id(node)] = (1 + max((d for d, _ in sub), default=0), 1 + sum(n for _, n in sub))
            if done[id(node)][1] > MAX_VALUES:
                return f"holds more than {MAX_VALUES} values"
            continue
        if id(node) in path:
            return "holds a container inside itself"
        if len(path) >= MAX_DEPTH:
            return f"nests deeper than {MAX_DEPTH} levels"
        path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in inside)
    return None


def _interpolation(node) -> str | None:
    """The dotted key of the first string holding `${` in node, or None (node passed _structure_fault)."""
    stack = [(node, "")]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, str):
            if "${" in node:
                return prefix or "<value>"
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
        stack.extend((v, f"{prefix}.{k}" if prefix else str(k)) for k, v in reversed(list(items)))
    return None


def _first_non_finite(state_dict: dict) -> str | None:
    for name, t in state_dict.items():
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            return str(name)
    return None


def _not_a_weight(state_dict: dict) -> str | None:
    """What is wrong with the first entry of state_dict that is not a dense tensor named by a string, or None."""
    for name, t in state_dict.items():
        if not isinstance(name, str):
            return f"has a key {name!r:.60} that is not a parameter name"
        if not isinstance(t, torch.Tensor):
            return f"entry {name!r} is {type(t).__name__}, not a tensor"
        if t.layout != torch.strided or t.is_quantized:
            return f"tensor {name!r} is a {'quantized' if t.is_quantized else str(t.layout).removeprefix('torch.')} " \
                   f"tensor, not a dense one"
    return None


def _open(path: Path):
    """The checkpoint file opened for reading; CheckpointError for anything but a readable regular file.

    Its type is checked before the open (opening a device can act on it) and on the descriptor, opened
    non-blocking: a FIFO put in its place meanwhile cannot hang the load."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {reason(e)}") from None
    raise CheckpointError(f"checkpoint {str(path)!r} is {file_kind(mode)}, not a checkpoint file; "
                          f"give ckpt_path=<run dir>/checkpoints/last.ckpt")


def read(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint as a dict of tensors and plain values; CheckpointError if it is not an allconv checkpoint."""
    path = Path(path)
    try:
        with _open(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on what a file holds (sparse, storages): the checks say
            ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
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
    fault = _structure_fault(ckpt)
    if fault:
        raise CheckpointError(f"checkpoint {str(path)!r} {fault}; an allconv checkpoint nests 7 levels and holds "
                              f"a few hundred values besides its tensors, refused")
    fault = _not_a_weight(ckpt["state_dict"])
    if fault:
        raise CheckpointError(f"checkpoint {str(path)!r}: state_dict {fault}; refused")
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
        # A run trained with trainer.precision=16-true, bf16-true or 64-true saves every weight in that dtype: such
        # a file is read (the cast to the network's float32 is what testing it at 32 bits means). Any other dtype
        # (integers, bool, complex, one weight unlike the others) is a file altered by hand: refused, never cast.
        one_dtype = {t.dtype for t in saved.values()}
        precision = one_dtype.pop() if len(one_dtype) == 1 and one_dtype <= RUN_DTYPES else None
        for name, t in shapes.items():
            if name in saved and saved[name].shape != t.shape:
                raise ValueError(f"hyper_parameters.net builds {name} of shape {tuple(t.shape)}, "
                                 f"the file holds {tuple(saved[name].shape)}")
            if name in saved and saved[name].dtype not in (t.dtype, precision if t.is_floating_point() else None):
                raise CheckpointError(f"checkpoint {str(path)!r}: state_dict tensor {name!r} is "
                                      f"{str(saved[name].dtype).removeprefix('torch.')}, the network holds "
                                      f"{str(t.dtype).removeprefix('torch.')} there; refused, not cast")
        module = build()
        module.load_state_dict(saved)
    except CheckpointError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own model "
                              f"({first[:160]})") from None
    return module.eval()


def load(path: str | Path, map_location="cpu") -> tuple[DictConfig, AllConvModule]:
    """(the run's config, the trained AllConvModule in eval mode) from a checkpoint file."""
    ckpt = read(path, map_location)
    return config(ckpt), module_from(ckpt, path)

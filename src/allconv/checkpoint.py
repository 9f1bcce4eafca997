"""Load a trained run from its checkpoint, one way, without running code.

eval, visualize and resume= all come through here. torch.load(weights_only=True) unpickles only
tensors and plain containers, so a crafted file cannot execute anything; the hyperparameters are
plain values (module.AllConvModule), so the network is rebuilt from the file alone. Anything that
is not such a checkpoint (crafted, truncated, corrupt, another project's) is one CheckpointError.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from allconv.errors import CheckpointError
from allconv.module import AllConvModule


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
    if not (isinstance(hp, dict) and isinstance(hp.get("net"), dict) and "state_dict" in ckpt):
        raise CheckpointError(f"checkpoint {str(path)!r} is not an allconv checkpoint "
                              f"(no state_dict or hyper_parameters.net)")
    return ckpt


def config(ckpt: dict) -> DictConfig:
    """The run config saved in a checkpoint (what the run was composed from)."""
    return OmegaConf.create(ckpt["hyper_parameters"].get("config") or {})


def load(path: str | Path, map_location="cpu") -> tuple[DictConfig, AllConvModule]:
    """(the run's config, the trained AllConvModule in eval mode) from a checkpoint file."""
    ckpt = read(path, map_location)
    hp = dict(ckpt["hyper_parameters"])
    hp["compile"] = False  # re-testing and visualising run eagerly
    try:
        module = AllConvModule(**hp)
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own model "
                              f"({first[:160]})") from None
    return config(ckpt), module.eval()

"""A run's record: what it is (identity.json, written once when it starts) and how it ended (metrics.json).

Both files are the project's own; nothing else describes a run (Hydra writes no `.hydra/` into a training
run). They may come from elsewhere, so they are read without following links, after a type and size check,
and parsed as plain data, depth-limited: a FIFO, a device, a link or a file nested to exhaust a parser is
one RunFolderError naming it.

identity.json, IDENTITY_FORMAT 2:
    settings    the run's composed config, resolved (an ${oc.env:...} is recorded as the value it had), less
                hydra and ckpt_path, as dotted keys: what the run trains with
    overrides   the command line's own overrides with their values resolved the same way: what `resume=`
                replays (a continuation never depends on the environment it is started from)
    data        the fingerprint of the arrays (raw bytes, after the limits)
    inputs      the fingerprint of everything that decides the network's inputs: the arrays, the
                preprocessing settings and the fit actually used (the ZCA's mean and matrix)
    precision   the precision the run trains in (trainer.precision=auto resolved on the machine that started it)
    cwd         the working directory it was started from (a relative data.path is relative to it)
Older folders hold format 1 (settings as written, unresolved; data) or no identity.json at all.

The checkpoint carries a copy of identity.json (the RunIdentity callback's state), so the two can be held
against each other: a record that disagrees with its own checkpoint was edited, and one that is missing or
damaged is rebuilt from the checkpoint.

metrics.json says how the run ended, in the one vocabulary of STATUS (folder, record and report alike).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from allconv.errors import RunFolderError
from allconv.files import NotRegularFile, read_regular, reason, write_atomic

IDENTITY_FORMAT = 2
MAX_BYTES = 4 << 20  # a record file is a few kB; a larger one is not this project's
MAX_DEPTH = 64  # nesting of a record (a config is 4 deep)
MAX_FIT = 64  # numbers in identity.json's fit (preprocessing.summary: 20)
FIT_TOLERANCE = 1e-6  # relative: two fits of one training set agree to ~1e-12, another fit differs at 1e-2 and more

# -- one vocabulary: a folder's state, a record's status and a report's row ------------------------------
NEW = "new"                  # no record: a new run may start here
STARTED = "started"          # identity.json only: stopped before its first checkpoint, started again by its command
INTERRUPTED = "interrupted"  # a signal or a kill after a checkpoint: continued from checkpoints/last.ckpt
FAILED = "failed"            # an error of the machine or the folder (a full disk): its command continues it
DIVERGED = "diverged"        # the loss became NaN or inf: the run's result; never continued
FINISHED = "finished"        # tested, metrics.json complete: never written again
UNREADABLE = "unreadable"    # (report) a record that cannot be read
ENDED = (INTERRUPTED, FAILED, DIVERGED, FINISHED)  # what metrics.json may say
OLDER_STATUS = {"ok": FINISHED}  # what folders of earlier versions wrote
DONE = (FINISHED, DIVERGED)  # a relaunched sweep skips these: training again would give the same result


# -- reading ---------------------------------------------------------------------------------------------
def read_bytes(path: Path, limit: int = MAX_BYTES) -> bytes | None:
    """A record file's bytes (None if absent), never through a link; RunFolderError for anything but a plain file
    of at most `limit` bytes (files.read_regular: a FIFO cannot block the read)."""
    path = Path(path)
    try:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); a run's record holds plain "
                                 f"files")
        return read_regular(path, limit)
    except FileNotFoundError:
        return None
    except NotRegularFile as e:
        raise RunFolderError(f"{path} {e}; a run's record holds plain files") from None
    except OSError as e:
        raise RunFolderError(f"{path} cannot be read: {reason(e)}") from None


def too_deep(node, limit: int = MAX_DEPTH) -> bool:
    stack = [(node, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def read_json(path: Path):
    """A record's JSON (None if absent); RunFolderError naming the file for anything else."""
    data = read_bytes(path)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not JSON ({str(e)[:80]})") from None
    except RecursionError:
        raise RunFolderError(f"{path} is nested too deep to be a record; refused") from None
    if too_deep(value):
        raise RunFolderError(f"{path} is nested more than {MAX_DEPTH} levels deep; a record is not, refused")
    return value


def write_json(path: Path, obj: dict) -> None:
    """Written whole or not at all; a refused write is a WriteError naming the file (files.write_atomic)."""
    write_atomic(path, (json.dumps(obj, indent=2, default=float) + "\n").encode())


# -- identity.json ---------------------------------------------------------------------------------------
def flat(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def check_identity(path: Path, identity) -> dict:
    """identity.json's content when it is this project's record (format 1 or 2); RunFolderError naming what is not."""
    if not isinstance(identity, dict) or not isinstance(identity.get("settings"), dict):
        raise RunFolderError(f"{path} holds no settings; it is not this project's record")
    if identity.get("format", 1) == IDENTITY_FORMAT:
        overrides = identity.get("overrides")
        if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise RunFolderError(f"{path} holds no list of overrides; it is not this project's record")
        fit = identity.get("fit")
        for key in ("data", "inputs", "precision", "fit"):
            kind = list if key == "fit" else str
            if not isinstance(identity.get(key), kind):
                raise RunFolderError(f"{path} records no {key}; it is damaged: delete it to rebuild it from the "
                                     f"run's checkpoint")
        if len(fit) > MAX_FIT or not all(isinstance(v, float) and math.isfinite(v) for v in fit):
            raise RunFolderError(f"{path}: fit is not a short list of finite numbers; it is damaged: delete it to "
                                 f"rebuild it from the run's checkpoint")
    return identity


def read_identity(path: Path) -> dict | None:
    """identity.json (None if absent), checked by check_identity."""
    identity = read_json(path)
    if identity is None and not os.path.lexists(path):
        return None
    return check_identity(path, identity)  # a file holding JSON null is no record either: refused like damage


def same(a, b) -> bool:
    """Two recorded values are one setting (1 and 1.0 are; True and 1 are not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def same_fit(a: list, b: list) -> bool:
    """Two fit summaries are one preprocessing fit (eigh's rounding differs between machines, not more)."""
    scale = max([abs(v) for v in a + b] + [1.0])
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=FIT_TOLERANCE, abs_tol=FIT_TOLERANCE * scale)
                                    for x, y in zip(a, b, strict=True))


# -- metrics.json ----------------------------------------------------------------------------------------
def status_of(outcome) -> str | None:
    """The STATUS a metrics.json records (older words translated), None when it records none of them."""
    if not isinstance(outcome, dict):
        return None
    status = outcome.get("status")
    status = OLDER_STATUS.get(status, status) if isinstance(status, str) else None
    if status == FAILED and "non-finite loss" in str(outcome.get("error", "")):  # how older versions said it
        return DIVERGED
    return status if status in ENDED else None


def read_outcome(path: Path) -> dict | None:
    """metrics.json as recorded (None if absent); RunFolderError if it cannot be read."""
    return read_json(path)


def finished(path: Path) -> dict | None:
    """metrics.json of a finished run, or None (absent, damaged, another status)."""
    try:
        outcome = read_outcome(path)
    except RunFolderError:
        return None
    return outcome if status_of(outcome) == FINISHED else None

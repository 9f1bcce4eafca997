"""Writing a run's files when the disk may be full, read-only or not ours: whole files or nothing.

write_atomic() is the one place where a run's files reach the disk (checkpoints, the whitening
cache, metrics.json, the learning curve and figures, the CSV log of csv_logger): the bytes go to a temporary
file in the same folder, which is flushed, fsynced and renamed over the target. A failure of any
of these steps (ENOSPC, EDQUOT, EACCES, EROFS, EIO, ...) removes the temporary file, leaves the
previous version of the target as it was, and becomes one WriteError naming the file and the
reason. Writers render to memory first, so a half-written file never has a name: torch.save's own
error for a full disk is a RuntimeError from its zip writer, not an OSError.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path

from allconv.errors import WriteError


def reason(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's words and the errno name."""
    if e.errno is None:
        return str(e) or type(e).__name__
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"{e.strerror or os.strerror(e.errno)} ({name})"


def write_error(path: str | Path, e: OSError) -> WriteError:
    err = WriteError(f"cannot write {path}: {reason(e)}")
    err.errno = e.errno
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write data to path as a whole (temporary file, fsync, rename); WriteError if the system refuses."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; these are ordinary files
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # a full disk may only say so here (delayed allocation)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def torch_bytes(obj) -> bytes:
    """torch.save into memory."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def figure_bytes(fig, **savefig_kwargs) -> bytes:
    """A matplotlib figure rendered into memory (format from savefig_kwargs, PNG by default)."""
    buf = io.BytesIO()
    fig.savefig(buf, **{"format": "png", **savefig_kwargs})
    return buf.getvalue()

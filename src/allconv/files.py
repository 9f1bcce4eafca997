"""Writing a run's files when the disk may be full, read-only or not ours: whole files or nothing.

write_atomic() is the one place where a run's files reach the disk (checkpoints, the whitening
cache, metrics.json, the learning curve and figures, the CSV log of csv_logger): the bytes go to a temporary
file in the same folder, which is flushed, fsynced and renamed over the target. A failure of any
of these steps (ENOSPC, EDQUOT, EACCES, EROFS, EIO, ...) removes the temporary file, leaves the
previous version of the target as it was, and becomes one WriteError naming the file and the
reason. Writers render to memory first, so a half-written file never has a name: torch.save's own
error for a full disk is a RuntimeError from its zip writer, not an OSError. A process killed between
the temporary file and the rename leaves `.<name>.<random>.tmp` behind; the next write of that target
removes it (STALE_TMP_S).

read_regular() is how a file from elsewhere is read: only a regular file, opened without blocking (a
FIFO in its place would hang the reader), of a bounded size. lock() is how a file is locked: a
filesystem without locks (Lustre mounted without flock, NFS without its lock daemon) is one warning
line naming what is then unguarded, not a failure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path

from allconv.errors import ConfigError, WriteError


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


# A temporary file untouched this long is a killed writer's: a live write modifies its file as it goes and
# renames it within seconds (the bytes are rendered before the file exists). Younger ones may be another
# process's write of the same target in progress, which must not lose its file before its rename.
STALE_TMP_S = 600


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary files of earlier, killed writes of path: `.<name>.<8 random chars>.tmp` beside it.

    mkstemp's names only, so a leftover of another target (`.<name>.x.<random>.tmp`) is never taken; only
    regular files and links, unlinked (a link is removed as a link, never followed)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        with os.scandir(path.parent) as entries:
            names = [e.name for e in entries if pattern.fullmatch(e.name)]
    except OSError:
        return
    for name in names:
        leftover = path.parent / name
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: the write goes on
            st = os.lstat(leftover)
            stale = stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > STALE_TMP_S)
            if stale:
                os.unlink(leftover)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write data to path as a whole (temporary file, fsync, rename); WriteError if the system refuses."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)  # first: on a full disk their space may be what this write needs
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


def file_kind(mode: int) -> str:
    """What a stat mode is, in words: 'a folder', 'a FIFO', ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISREG, "a plain file")):
        if test(mode):
            return name
    return "not a regular file"


class NotRegularFile(ValueError):
    """read_regular() refused a path: str(e) says what it is instead (a folder, a FIFO, a device, too large)."""


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of path if it is a regular file of at most limit bytes; NotRegularFile otherwise.

    Checked before it is opened (opening a device can act on it) and again on the open descriptor, which is
    opened non-blocking: a FIFO put in its place meanwhile cannot hang the reader. OSError as the system says
    (FileNotFoundError, PermissionError, ...)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"is {file_kind(mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"is {file_kind(st.st_mode)}, not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise NotRegularFile(f"holds more than {limit} bytes")
    return b"".join(chunks)


# flock's errors where the filesystem has no locks at all: Lustre mounted without -o flock (ENOSYS), NFS
# without its lock daemon (ENOLCK), filesystems that do not implement it (EOPNOTSUPP).
LOCKLESS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
_warned_lockless: set[str] = set()


def lock(fd: int, path: str | Path, *, blocking: bool, guards: str) -> bool:
    """An exclusive flock on fd, which is open on path. True: held (closing fd releases it).

    False: the filesystem has no locks; one line `warning: cannot lock <path>: <reason>; <guards>` (guards
    says what is now unguarded) is printed the first time for each path, and the caller goes on unlocked.
    BlockingIOError (blocking=False) when another process holds the lock; any other OSError propagates."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno not in LOCKLESS:  # EINVAL, EIO, ...: the filesystem refused the lock itself
            refused = WriteError(f"cannot lock {path}: {reason(e)}")
            refused.errno = e.errno  # what the system said, for a caller that asks
            raise refused from None
        if str(path) not in _warned_lockless:
            _warned_lockless.add(str(path))
            print(f"warning: cannot lock {path}: {reason(e)}; {guards}", file=sys.stderr, flush=True)
        return False
    return True


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


def check_output_dir(path: str | Path, key: str) -> None:
    """The folder exists or can be created, and a file can be written in it (checked by writing one)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(path)!r} cannot be created: {str(probe)!r} is a file")
    if probe == path:
        try:
            test = path / f".allconv-write-test-{os.getpid()}"
            test.write_bytes(b"")
            test.unlink()
        except OSError as e:
            raise ConfigError(f"{key}={str(path)!r} cannot be written ({e.strerror or type(e).__name__})") from None
    elif not os.access(probe, os.W_OK | os.X_OK) or not _can_mkdir(probe):
        raise ConfigError(f"{key}={str(path)!r} cannot be created: {str(probe)!r} is not writable")


def _can_mkdir(parent: Path) -> bool:
    test = parent / f".allconv-mkdir-test-{os.getpid()}"
    try:
        test.mkdir()
        test.rmdir()
        return True
    except OSError:
        return False


def lock_folder(path: Path, guards: str) -> int:
    """An exclusive flock on the folder itself (no lock file written into it), held until the returned descriptor is
    closed; BlockingIOError if another process holds it. A filesystem without locks: one warning (lock())."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lock(fd, path, blocking=False, guards=guards)
    except BaseException:
        os.close(fd)
        raise
    return fd

"""Unpickling files from outside (the official CIFAR python format) without running anything they ask for.

A pickle is a program: each global it names is imported and may be called with arguments of the
file's choosing (os.system, builtins.exec, ...). The official CIFAR files are dicts of lists,
numbers, strings and numpy arrays, so the unpickler here resolves only the globals that numpy and
Python write for such values and refuses every other global before it is imported. Admitted
callables are data constructors whose allocations are bounded by the bytes of the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

_np_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, under whichever module name it has


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the admitted set; str() names it."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _NDArrayType:
    """Stands for numpy.ndarray in a pickle: only _reconstruct accepts it, so ndarray(shape) is never called
    with a shape of the file's choosing (an allocation not backed by the file's bytes)."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may only be named as the type rebuilt by _reconstruct")


_NDARRAY = _NDArrayType()


def _reconstruct(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then __setstate__ with the data, whose
    # length numpy checks against the shape; any other shape here would allocate memory the file does not hold.
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"numpy _reconstruct of {subtype!r} with shape {shape!r}; "
                                     f"allowed: ndarray with shape (0,), as numpy writes it")
    return _np_reconstruct(np.ndarray, (0,), dtype)


def _frombuffer(buf, dtype, shape, order):
    # protocol 5: the array's bytes are in the file, so the array is never larger than they are
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Python 3 writes bytes under protocols 0-2 as _codecs.encode(text, 'latin1'); no other codec is needed
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}; allowed: latin1, as Python writes bytes")
    return text.encode("latin1")


ALLOWED = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Resolves the globals of ALLOWED only; RefusedGlobal for any other, before anything is imported."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of a plain data pickle")


def load(path: str | Path, encoding: str = "latin1"):
    """Unpickle one file with SafeUnpickler; latin1 by default, as Python 2 pickles (the CIFAR files) need."""
    with open(path, "rb") as f:
        return SafeUnpickler(f, encoding=encoding).load()

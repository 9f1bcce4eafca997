"""The paper's input pipeline: pylearn2's global contrast normalisation and ZCA whitening.

Exactly as pylearn2's make_cifar10_gcn_whitened.py (GlobalContrastNormalization(scale=55) then
ZCA(filter_bias=0.1)), on plain tensors/arrays, no Lightning. The ZCA fit (a 3072x3072
eigendecomposition over the training set) is cached on disk keyed by the data and the parameters,
so a second run and every DDP rank load it instead of refitting. Cache writes are atomic and
serialised by a file lock, so concurrent jobs sharing a cache fit it once (on a filesystem without locks
each may fit it, one warning line says so; writes stay atomic, so none sees a half-written file). A cache
that cannot be written (full disk, read-only or foreign folder) is not fatal: the fit is used from
memory and one line on stderr says so. A cache file is checked before it is used (its key, shapes,
a finite, symmetric, positive definite P, the data's mean): one that fails is refitted and replaced,
and one line on stderr says which file and why.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

from allconv.errors import DataError, WriteError
from allconv.files import NotRegularFile, lock, read_regular, torch_bytes, write_atomic

CACHE_VERSION = 1


def global_contrast_normalize(x, scale: float = 55.0, min_divisor: float = 1e-8):
    """pylearn2's global_contrast_normalize(X, scale, subtract_mean=True, use_std=False, sqr_bias=0).

    x: float array or tensor (N, D). Each row has its mean removed and is divided by its L2 norm /
    scale; a divisor below min_divisor (a constant image) is replaced by 1, as pylearn2 does.
    """
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(x) if is_numpy else x
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"global_contrast_normalize expects a float (N, D) array, got {tuple(t.shape)} {t.dtype}")
    t = t - t.mean(dim=1, keepdim=True)
    divisor = t.pow(2).sum(dim=1, keepdim=True).sqrt() / scale
    divisor = torch.where(divisor < min_divisor, torch.ones_like(divisor), divisor)
    out = t / divisor
    return out.numpy() if is_numpy else out


class ZCA:
    """pylearn2's ZCA: P = V diag(1/sqrt(eig)) V^T of cov = Xc^T Xc / N + filter_bias * I.

    All components are kept. fit() works in float64; transform() returns x's dtype.
    """

    def __init__(self, filter_bias: float = 0.1):
        if not filter_bias > 0:
            raise ValueError(f"ZCA filter_bias must be > 0, got {filter_bias!r}")
        self.filter_bias = float(filter_bias)
        self.mean: torch.Tensor | None = None
        self.P: torch.Tensor | None = None

    def fit(self, x, chunk: int = 8192) -> ZCA:
        t = torch.as_tensor(x)
        if t.ndim != 2:
            raise ValueError(f"ZCA.fit expects (N, D), got {tuple(t.shape)}")
        n, d = t.shape
        mean = t.double().mean(dim=0)
        cov = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, n, chunk):  # chunks bound the float64 copy's memory
            xc = t[i:i + chunk].double() - mean
            cov.addmm_(xc.T, xc)
        cov /= n
        cov.diagonal().add_(self.filter_bias)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        self.mean = mean
        self.P = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
        return self

    def transform(self, x):
        if self.P is None:
            raise RuntimeError("ZCA.transform called before fit")
        is_numpy = isinstance(x, np.ndarray)
        t = torch.from_numpy(x) if is_numpy else x
        dtype = t.dtype if t.is_floating_point() else torch.float32
        out = (t.to(dtype) - self.mean.to(dtype)) @ self.P.to(dtype)
        return out.numpy() if is_numpy else out

    def state_dict(self) -> dict:
        return {"version": CACHE_VERSION, "filter_bias": self.filter_bias, "mean": self.mean, "P": self.P}

    @classmethod
    def from_state_dict(cls, state: dict) -> ZCA:
        zca = cls(state["filter_bias"])
        zca.mean, zca.P = state["mean"], state["P"]
        return zca


def summary(mean: torch.Tensor, P: torch.Tensor, k: int = 4) -> list[float]:
    """k + k*k numbers that tell one whitening fit from another: mean and P projected on k fixed random directions.
    Two fits of the same images on two machines agree to ~1e-12 (eigh's rounding), any other fit does not."""
    r = torch.randn(P.shape[0], k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [float(v) for v in torch.cat([mean.double() @ r, (r.T @ P.double() @ r).flatten()])]


def fingerprint(*arrays: np.ndarray, **params) -> str:
    """A key for the data and the parameters: sha1 over the raw bytes, shapes, dtypes and params."""
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(memoryview(a).cast("B"))
    h.update(repr(sorted(params.items())).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock next to path; without one when the folder cannot hold the lock file (read-only) or its
    filesystem has no locks (one warning line, files.lock)."""
    lock_path = path.with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        if e.errno == errno.ELOOP:  # opening through a link would create or lock a file outside the cache
            raise DataError(f"{lock_path} is a symbolic link; the whitening cache writes only inside its own "
                            f"folder: remove the link") from None
        yield
        return
    with f:  # closing the file releases the lock
        lock(f.fileno(), lock_path, blocking=True,
             guards="two runs could now fit the same ZCA cache at once (the cache file is still written atomically)")
        yield


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save as a whole file (files.write_atomic): readers see old or new, never half; WriteError if refused."""
    write_atomic(path, torch_bytes(obj))


def _read_cache(path: Path, key: str, x_gcn: torch.Tensor, filter_bias: float) -> tuple[ZCA | None, str]:
    """(the cached fit, "") if path holds a whitening fit of x_gcn under key, else (None, what is wrong).

    Beyond what the file claims (version, key, filter_bias), the numbers must be what a fit can be:
    mean is x_gcn's mean, and P = (C + filter_bias I)^-1/2 for some covariance C, i.e. symmetric with
    eigenvalues in (0, 1/sqrt(filter_bias)].
    """
    d = x_gcn.shape[1]
    most = (d * d + d) * 8 + (1 << 20)  # float64 mean and P, and room for the zip's records
    try:
        size = path.stat().st_size
        if size > most:
            return None, f"{size} bytes, more than a fit for {d} inputs takes"
        state = torch.load(io.BytesIO(read_regular(path, most)), map_location="cpu", weights_only=True)
    except NotRegularFile as e:  # a FIFO would block torch.load for good
        return None, str(e)
    except Exception as e:  # truncated, garbage, not a torch file, or refused by weights_only
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return None, f"unreadable: {type(e).__name__}{': ' + detail if detail else ''}"
    if not isinstance(state, dict):
        return None, f"holds {type(state).__name__}, not a dict"
    if state.get("version") != CACHE_VERSION:
        return None, f"version {state.get('version')!r}, expected {CACHE_VERSION}"
    if state.get("key") != key:
        return None, f"key {state.get('key')!r}, expected {key!r}" if "key" in state else "it records no key"
    if state.get("filter_bias") != filter_bias:
        return None, f"filter_bias {state.get('filter_bias')!r}, expected {filter_bias!r}"
    for name, shape in (("mean", (d,)), ("P", (d, d))):
        t = state.get(name)
        if not isinstance(t, torch.Tensor):
            return None, f"{name} is {type(t).__name__}, not a tensor"
        if not t.is_floating_point() or tuple(t.shape) != shape:
            return None, f"{name} is {t.dtype} {tuple(t.shape)}, expected floating point {shape}"
        if not torch.isfinite(t).all():
            return None, f"{name} is not finite"
    mean, P = state["mean"].double(), state["P"].double()
    if not torch.allclose(mean, x_gcn.sum(dim=0, dtype=torch.float64) / len(x_gcn), rtol=1e-5, atol=1e-4):
        return None, "mean is not the training data's mean"
    # float32 rounding of a float64 fit stays well inside these tolerances
    if (P - P.T).abs().max() > 1e-5 * P.abs().max():
        return None, "P is not symmetric"
    if torch.linalg.cholesky_ex(P).info != 0:
        return None, "P is not positive definite"
    top = (1 + 1e-3) / filter_bias ** 0.5
    if torch.linalg.cholesky_ex(top * torch.eye(d, dtype=P.dtype) - P).info != 0:
        return None, f"P has an eigenvalue above 1/sqrt(filter_bias) = {1 / filter_bias ** 0.5:.4g}"
    return ZCA.from_state_dict(state), ""


def fit_zca_cached(x_gcn: torch.Tensor, key: str, cache_dir: str | Path | None,
                   filter_bias: float = 0.1) -> tuple[ZCA, bool]:
    """Fit ZCA on x_gcn, or load the fit cached under key. Returns (zca, loaded_from_cache).

    A cache file is outside data: one that is not a valid fit of x_gcn under key (see _read_cache) is
    refitted and replaced, with one warning line on stderr.
    """
    if cache_dir is None:
        return ZCA(filter_bias).fit(x_gcn), False
    path = Path(cache_dir) / f"zca-{key}.pt"
    with _locked(path):  # one fitter per key; the others wait and then load its file
        fault = "it is a symbolic link" if path.is_symlink() else ""  # replaced, never followed
        if path.exists() and not fault:
            zca, fault = _read_cache(path, key, x_gcn, filter_bias)
            if zca is not None:
                return zca, True
        zca = ZCA(filter_bias).fit(x_gcn)
        bad = f"warning: ZCA cache {path} is not a valid fit ({fault}); refitted" if fault else ""
        try:
            atomic_torch_save({**zca.state_dict(), "key": key}, path)
        except WriteError as e:  # a cache is an optimisation: train on, refit next time
            print(f"{bad + ', but ' if bad else 'warning: '}{e}; the whitening fit is used from memory",
                  file=sys.stderr)
        else:
            if bad:
                print(f"{bad} and replaced", file=sys.stderr)
        return zca, False


def standardize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of NCHW float images (the 'standardize' alternative)."""
    return x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)

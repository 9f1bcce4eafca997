"""GCN and ZCA against NumPy references written from PAPER.md's formulas; the ZCA fit cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allconv import preprocessing as pp


def gcn_reference(x: np.ndarray, scale: float = 55.0, min_divisor: float = 1e-8) -> np.ndarray:
    """PAPER.md: subtract the image's mean, divide by its L2 norm (min divisor 1e-8), multiply by 55."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    divisor = np.sqrt((xc ** 2).sum(axis=1, keepdims=True)) / scale
    divisor[divisor < min_divisor] = 1.0
    return xc / divisor


def zca_reference(x: np.ndarray, filter_bias: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """PAPER.md: mean-centre, cov = X^T X / N + 0.1 I, P = V diag(1/sqrt(eig)) V^T. Returns (mean, P)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / len(x) + filter_bias * np.eye(x.shape[1])
    w, v = np.linalg.eigh(cov)
    return mean, (v / np.sqrt(w)) @ v.T


def images(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Raw 0..255 float "images" with correlated pixels and a spread of variances."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.logspace(0, -2, d)[:, None]
    x = rng.normal(size=(n, d)) @ mixing * 40 + 128
    return np.clip(x, 0, 255)


def test_gcn_matches_reference():
    x = images(50, 3072)
    ref = gcn_reference(x)
    got = pp.global_contrast_normalize(x.copy())
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # float32 tensors too; every row has mean 0 and norm 55
    got_t = pp.global_contrast_normalize(torch.from_numpy(x).float())
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float32
    np.testing.assert_allclose(got_t.numpy(), ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ref.mean(axis=1), 0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 55.0, rtol=1e-12)
    np.testing.assert_allclose(pp.global_contrast_normalize(x, scale=2.0), gcn_reference(x, scale=2.0), rtol=1e-10)


def test_gcn_min_divisor_rule():
    d = 3072
    rng = np.random.default_rng(1)
    pattern = rng.normal(size=d)
    pattern -= pattern.mean()
    pattern /= np.linalg.norm(pattern)
    constant = np.full(d, 7.0)
    tiny = 100.0 + 1e-7 * pattern  # norm 1e-7 -> divisor 1.8e-9 < 1e-8: replaced by 1 (not blown up to norm 55)
    small = 100.0 + 1e-5 * pattern  # norm 1e-5 -> divisor 1.8e-7 > 1e-8: scaled to norm 55
    x = np.stack([constant, tiny, small])
    got = pp.global_contrast_normalize(x.copy())
    np.testing.assert_allclose(got, gcn_reference(x), rtol=1e-6, atol=1e-12)
    assert np.all(got[0] == 0) and np.all(np.isfinite(got))
    assert np.linalg.norm(got[1]) < 1e-6
    assert np.linalg.norm(got[2]) == pytest.approx(55.0, rel=1e-3)


def test_gcn_rejects_non_float_or_wrong_rank():
    with pytest.raises(ValueError):
        pp.global_contrast_normalize(np.zeros((4, 3072), dtype=np.uint8))
    with pytest.raises(ValueError):
        pp.global_contrast_normalize(np.zeros((4, 3, 32, 32), dtype=np.float32))


def test_zca_matches_reference():
    x = gcn_reference(images(400, 192, seed=2))
    mean, p_ref = zca_reference(x)
    zca = pp.ZCA(filter_bias=0.1).fit(x)
    np.testing.assert_allclose(zca.mean.numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(zca.P.numpy(), p_ref, rtol=1e-7, atol=1e-8)
    test = gcn_reference(images(30, 192, seed=3))
    np.testing.assert_allclose(zca.transform(test), (test - mean) @ p_ref, rtol=1e-7, atol=1e-7)
    out32 = zca.transform(torch.from_numpy(test).float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), (test - mean) @ p_ref, rtol=1e-3, atol=1e-3)
    # P is symmetric (ZCA, not PCA whitening) and keeps all components
    np.testing.assert_allclose(zca.P.numpy(), zca.P.numpy().T, atol=1e-10)
    assert np.linalg.matrix_rank(zca.P.numpy()) == 192
    # another filter bias gives another P, still matching the reference
    _, p_ref2 = zca_reference(x, 1.0)
    np.testing.assert_allclose(pp.ZCA(1.0).fit(x).P.numpy(), p_ref2, rtol=1e-7, atol=1e-8)


def test_whitened_training_covariance_is_regularised_identity():
    d = 256
    x = gcn_reference(images(1000, d, seed=4))
    zca = pp.ZCA(0.1).fit(x)
    out = zca.transform(x)
    cov_out = np.cov(out, rowvar=False, bias=True)
    xc = x - x.mean(axis=0)
    c = xc.T @ xc / len(x)
    # out = Xc P with P = (C + 0.1 I)^-1/2, so cov(out) = P C P = I - 0.1 (C + 0.1 I)^-1
    expected = np.eye(d) - 0.1 * np.linalg.inv(c + 0.1 * np.eye(d))
    np.testing.assert_allclose(cov_out, expected, atol=1e-8)
    # on the high-variance eigen-directions of C it is the identity: v^T cov v = lam / (lam + 0.1) ~ 1
    lam, v = np.linalg.eigh(c)
    strong = lam > 10.0
    assert strong.sum() >= 10
    along = np.einsum("di,de,ei->i", v[:, strong], cov_out, v[:, strong])
    np.testing.assert_allclose(along, lam[strong] / (lam[strong] + 0.1), rtol=1e-8)
    assert np.all(along > 0.99)
    # and off-diagonal terms between those directions vanish
    sub = v[:, strong].T @ cov_out @ v[:, strong]
    np.testing.assert_allclose(sub, np.diag(np.diag(sub)), atol=1e-8)


def test_zca_rejects_bad_inputs():
    with pytest.raises(ValueError):
        pp.ZCA(0.0)
    with pytest.raises(RuntimeError):
        pp.ZCA().transform(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        pp.ZCA().fit(np.zeros((2, 3, 4)))


# -- the fit cache --------------------------------------------------------------------------------

def _data(seed=0, n=300, d=96):
    return torch.from_numpy(gcn_reference(images(n, d, seed))).float()


def test_cache_second_call_loads(tmp_path):
    x = _data()
    key = pp.fingerprint(x.numpy(), gcn_scale=55.0, filter_bias=0.1)
    zca1, loaded1 = pp.fit_zca_cached(x, key, tmp_path)
    assert loaded1 is False
    files = sorted(p.name for p in tmp_path.glob("zca-*.pt"))
    assert files == [f"zca-{key}.pt"]
    zca2, loaded2 = pp.fit_zca_cached(x, key, tmp_path)
    assert loaded2 is True
    assert torch.equal(zca1.P, zca2.P) and torch.equal(zca1.mean, zca2.mean)
    np.testing.assert_allclose(zca2.P.numpy(), zca_reference(x.numpy())[1], rtol=1e-5, atol=1e-6)
    # no cache dir: always a fresh fit
    assert pp.fit_zca_cached(x, key, None)[1] is False


def test_cache_key_changes_with_data_and_params():
    a = _data(0).numpy()
    b = a.copy()
    b[0, 0] += 1.0
    k = pp.fingerprint(a, gcn_scale=55.0, filter_bias=0.1)
    assert k == pp.fingerprint(a.copy(), gcn_scale=55.0, filter_bias=0.1)
    assert k != pp.fingerprint(b, gcn_scale=55.0, filter_bias=0.1)
    assert k != pp.fingerprint(a[:-1], gcn_scale=55.0, filter_bias=0.1)
    assert k != pp.fingerprint(a, gcn_scale=55.0, filter_bias=0.2)
    assert k != pp.fingerprint(a, gcn_scale=50.0, filter_bias=0.1)
    assert k != pp.fingerprint(a.astype(np.float64), gcn_scale=55.0, filter_bias=0.1)


def test_cache_filter_bias_mismatch_refits(tmp_path):
    x = _data()
    pp.fit_zca_cached(x, "samekey", tmp_path, filter_bias=0.1)
    zca, loaded = pp.fit_zca_cached(x, "samekey", tmp_path, filter_bias=0.5)
    assert loaded is False and zca.filter_bias == 0.5
    np.testing.assert_allclose(zca.P.numpy(), zca_reference(x.numpy(), 0.5)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("garbage", [b"", b"not a torch file at all", b"PK\x03\x04truncated zip"])
def test_corrupt_cache_file_is_refit(tmp_path, garbage):
    x = _data()
    path = tmp_path / "zca-k1.pt"
    path.write_bytes(garbage)
    zca, loaded = pp.fit_zca_cached(x, "k1", tmp_path)
    assert loaded is False
    state = torch.load(path, map_location="cpu", weights_only=True)  # replaced by a valid file
    assert torch.equal(state["P"], zca.P)
    assert pp.fit_zca_cached(x, "k1", tmp_path)[1] is True


CHILD = """
import sys, time, json
from pathlib import Path
import numpy as np, torch
from allconv import preprocessing as pp
cache, go = Path(sys.argv[1]), Path(sys.argv[2])
x = torch.from_numpy(np.random.default_rng(0).normal(size=(2000, 512))).float()
while not go.exists():
    time.sleep(0.01)
zca, loaded = pp.fit_zca_cached(x, "shared", cache)
print(json.dumps([loaded, zca.P.sum().item()]))
"""


@pytest.mark.subprocess
def test_concurrent_fits_produce_one_valid_file(tmp_path):
    import json
    import subprocess

    from conftest import PYTHON

    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([PYTHON, "-c", CHILD, str(cache), str(go)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    go.touch()  # both start fitting at (about) the same moment
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    # the lock serialises them: one fits, the other waits and loads that fit
    assert sorted(r[0] for r in results) == [False, True]
    assert results[0][1] == results[1][1]
    assert [p.name for p in cache.iterdir() if p.suffix == ".pt"] == ["zca-shared.pt"]
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
    state = torch.load(cache / "zca-shared.pt", map_location="cpu", weights_only=True)
    assert state["P"].shape == (512, 512) and torch.isfinite(state["P"]).all()

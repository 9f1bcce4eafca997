"""Data sources (official CIFAR format, download with the network mocked, npz), the split, DeviceLoader."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from allconv import cifar_files as F
from allconv import data as D
from allconv import preprocessing as pp

# -- the official python format -------------------------------------------------------------------

@pytest.mark.parametrize("name,n_classes", [("cifar10", 10), ("cifar100", 100)])
def test_official_reader_on_small_files(make_official, name, n_classes):
    root, written = make_official(name)
    got = F.load_official(name, root, verify_md5=False)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(got[k], written[k])
    assert got["x_train"].shape[1:] == (32, 32, 3) and got["x_train"].dtype == np.uint8
    assert got["y_train"].dtype == np.int64
    assert got["classes"] == written["classes"] and len(got["classes"]) == n_classes


def test_read_cifar_batch_pixel_layout(tmp_path):
    import pickle

    rows = np.zeros((1, 3072), dtype=np.uint8)
    rows[0, 0] = 10  # R at (0, 0)
    rows[0, 1024 + 33] = 20  # G at (1, 1)
    rows[0, 2048 + 31] = 30  # B at (0, 31)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({"data": rows, "labels": [3]}, f)
    x, y = F.read_cifar_batch(tmp_path / "b", "labels")
    assert x.shape == (1, 32, 32, 3) and list(y) == [3]
    assert x[0, 0, 0, 0] == 10 and x[0, 1, 1, 1] == 20 and x[0, 0, 31, 2] == 30 and x.sum() == 60


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_read_cifar_batch_rejects_non_cifar_files(tmp_path, content):
    (tmp_path / "b").write_bytes(content)
    with pytest.raises(D.DataError) as e:
        F.read_cifar_batch(tmp_path / "b", "labels")
    assert "\n" not in str(e.value) and "official" in str(e.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_md5_check_fails_on_non_official_files(make_official, name):
    root, _ = make_official(name)
    with pytest.raises(D.DataError) as e:
        F.load_official(name, root, verify_md5=True)
    msg = str(e.value)
    assert "\n" not in msg and "md5" in msg
    first = "data_batch_1" if name == "cifar10" else "train"
    assert first in msg


def test_missing_official_file_is_a_data_error(make_official):
    root, _ = make_official("cifar10")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(D.DataError, match="data_batch_3"):
        F.load_official("cifar10", root, verify_md5=False)


# -- download, with only the network mocked ----------------------------------------------------------

def _archive_of(tmp_path: Path, make_official, name: str) -> tuple[Path, dict]:
    src, written = make_official(name, root=tmp_path / "server")
    folder = F.OFFICIAL[name][0]
    archive = tmp_path / "server" / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / folder, arcname=folder)
    return archive, written


def _mock_network(monkeypatch, archive: Path) -> list:
    import shutil

    import torchvision.datasets.utils as tvu

    calls = []

    def fake_urlretrieve(url, fpath, *a, **k):
        calls.append(url)
        shutil.copyfile(archive, fpath)

    monkeypatch.setattr(tvu, "_urlretrieve", fake_urlretrieve)
    monkeypatch.setattr(tvu, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tvu, "_is_remote_location_available", lambda: False)
    return calls


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_official_with_mocked_network(tmp_path, make_official, monkeypatch, name):
    archive, written = _archive_of(tmp_path, make_official, name)
    calls = _mock_network(monkeypatch, archive)
    ds = F._torchvision_dataset(name)
    # the served archive is ours, so make torchvision's md5 of the archive the one of our archive
    monkeypatch.setattr(ds, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "root"
    F.download_official(name, root)
    assert calls == [ds.url]
    got = F.load_official(name, root, verify_md5=False)
    np.testing.assert_array_equal(got["x_test"], written["x_test"])
    np.testing.assert_array_equal(got["y_train"], written["y_train"])
    # already there: no second download
    F.download_official(name, root)
    assert len(calls) == 1


def test_download_with_wrong_archive_md5_fails_with_one_line(tmp_path, make_official, monkeypatch):
    archive, _ = _archive_of(tmp_path, make_official, "cifar10")
    _mock_network(monkeypatch, archive)  # the served file is not the official archive: md5 mismatch
    root = tmp_path / "root"
    with pytest.raises(D.DataError) as e:
        F.download_official("cifar10", root)
    assert "\n" not in str(e.value) and "md5" in str(e.value)
    assert not (root / "cifar-10-batches-py").exists()  # nothing extracted from a bad archive


# -- npz -----------------------------------------------------------------------------------------------

def test_load_npz(make_npz):
    path = make_npz(n_train=20, n_test=10, y_train=np.arange(20, dtype=np.int32) % 10)
    got = F.load_npz(path, 10)
    with np.load(path) as f:
        np.testing.assert_array_equal(got["x_train"], f["x_train"])
        np.testing.assert_array_equal(got["x_test"], f["x_test"])
    assert got["y_train"].dtype == np.int64 and list(got["y_train"][:3]) == [0, 1, 2]
    assert got["classes"] == [f"class{i}" for i in range(10)]


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("corrupt", "not a readable"),
    ("no_key", "y_test"),
    ("dtype", "float32"),
    ("shape", r"\(20, 32, 32, 1\)"),
    ("labels_high", "label 10"),
    ("labels_neg", "label -1"),
    ("labels_len", "y_train"),
    ("labels_float", "float"),
])
def test_load_npz_errors_are_one_line(tmp_path, make_npz, case, match):
    n = 20
    kw = {
        "no_key": dict(y_test=None),
        "dtype": dict(x_train=np.zeros((n, 32, 32, 3), np.float32)),
        "shape": dict(x_train=np.zeros((n, 32, 32, 1), np.uint8)),
        "labels_high": dict(y_train=np.full(n, 10)),
        "labels_neg": dict(y_test=np.full(10, -1)),
        "labels_len": dict(y_train=np.zeros(n - 1, np.int64)),
        "labels_float": dict(y_train=np.zeros(n, np.float32)),
    }.get(case, {})
    path = make_npz(n_train=n, n_test=10, **kw)
    if case == "missing":
        path = tmp_path / "nope.npz"
    if case == "corrupt":
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(D.DataError, match=match) as e:
        F.load_npz(path, 10)
    assert "\n" not in str(e.value)


# -- the DataModule: split before the fit ---------------------------------------------------------------

def test_val_split_is_held_out_before_the_fit(make_npz, cache_dir, monkeypatch):
    path = make_npz(n_train=60, n_test=10)
    seen = []

    def spy(x, key, cdir, filter_bias=0.1):  # records what the fit sees; skips the slow 3072x3072 eigh
        seen.append(x.clone())
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        state = {"filter_bias": filter_bias, "mean": x.double().mean(0), "P": eye}
        return pp.ZCA.from_state_dict(state), False

    monkeypatch.setattr(pp, "fit_zca_cached", spy)
    dm = D.CIFARDataModule(source="npz", path=str(path), val_size=15, cache_dir=str(cache_dir))
    dm.validate()
    dm.setup("fit")
    raw = F.load_npz(path, 10)
    assert len(dm.tensors["x_train"]) == 45 and len(dm.tensors["x_val"]) == 15 and len(dm.tensors["x_test"]) == 10
    # train and val partition the original training labels
    assert sorted(torch.cat([dm.tensors["y_train"], dm.tensors["y_val"]]).tolist()) == sorted(raw["y_train"].tolist())
    # the fit saw exactly the 45 kept training images, GCN'd, and none of the validation images
    assert len(seen) == 1 and seen[0].shape == (45, 3072)
    flat = torch.from_numpy(raw["x_train"].transpose(0, 3, 1, 2).reshape(60, -1).astype(np.float32))
    gcn_all = pp.global_contrast_normalize(flat)
    rows = {tuple(r) for r in seen[0].numpy().round(3)}
    in_fit = np.array([tuple(r) in rows for r in gcn_all.numpy().round(3)])
    assert in_fit.sum() == 45
    whitened_val = dm.tensors["x_val"].reshape(15, -1)
    assert whitened_val.shape == (15, 3072)
    # the transform uses the train-only fit (train mean ~0); the split is reproducible
    assert dm.tensors["x_train"].reshape(45, -1).mean(0).abs().max() < 1e-3
    dm2 = D.CIFARDataModule(source="npz", path=str(path), val_size=15, cache_dir=str(cache_dir))
    dm2.setup("fit")
    assert torch.equal(dm2.tensors["y_val"], dm.tensors["y_val"])
    assert torch.equal(dm2.tensors["x_val"], dm.tensors["x_val"])


def test_validate_rejects_val_size_not_below_train(make_npz, tmp_path):
    path = make_npz(n_train=20, n_test=10)
    with pytest.raises(D.DataError, match="val_size=20"):
        D.CIFARDataModule(source="npz", path=str(path), val_size=20, cache_dir=str(tmp_path)).validate()


# -- DeviceLoader and augmentation ------------------------------------------------------------------------

def _xy(n=50):
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    return x, torch.arange(n)


def test_device_loader_batches_cover_the_data_once():
    x, y = _xy(50)
    loader = D.DeviceLoader(x, y, 16, shuffle=True, seed=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(50))
    for bx, by in batches:
        assert torch.equal(bx[:, 0, 0, 0], by.float())  # images stay paired with their labels
    assert len(D.DeviceLoader(x, y, 16, shuffle=True, drop_last=True)) == 3
    assert [len(b[1]) for b in D.DeviceLoader(x, y, 16, shuffle=True, drop_last=True)] == [16, 16, 16]
    assert torch.equal(torch.cat([b[1] for b in D.DeviceLoader(x, y, 16)]), y)  # eval: in order


def test_device_loader_order_is_deterministic_per_epoch():
    x, y = _xy(50)
    epoch = {"e": 0}
    loader = D.DeviceLoader(x, y, 10, shuffle=True, seed=1, epoch=lambda: epoch["e"])
    a = torch.cat([b[1] for b in loader])
    assert torch.equal(a, torch.cat([b[1] for b in loader]))
    epoch["e"] = 1
    b = torch.cat([b[1] for b in loader])
    assert not torch.equal(a, b)
    other_seed = D.DeviceLoader(x, y, 10, shuffle=True, seed=2, epoch=lambda: 0)
    assert not torch.equal(a, torch.cat([b[1] for b in other_seed]))


@pytest.mark.parametrize("n,shuffle", [(50, True), (51, True), (51, False)])
def test_ddp_shards_are_disjoint_and_cover(n, shuffle):
    x, y = _xy(n)
    shards, steps = [], []
    for rank in range(2):
        loader = D.DeviceLoader(x, y, 8, shuffle=shuffle, seed=5, rank=rank, world_size=2)
        batches = [b[1] for b in loader]
        assert len(loader) == len(batches)  # what Lightning counts is what the loader yields
        shards.append(torch.cat(batches).tolist())
        steps.append(len(loader))
    assert not set(shards[0]) & set(shards[1])
    union = set(shards[0]) | set(shards[1])
    if shuffle:  # equal shards so ranks step together: at most world_size - 1 images left out per epoch
        assert len(shards[0]) == len(shards[1]) == n // 2
        assert len(union) == n - n % 2
        assert steps[0] == steps[1]
    else:  # evaluation sees everything, each image once
        assert sorted(shards[0] + shards[1]) == list(range(n))
        assert sorted(len(s) for s in shards) == [n // 2, n - n // 2]


def test_translate_and_flip_shapes_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 32, 32)
    out0 = D.translate_and_flip(x, 0, g)
    assert out0.shape == x.shape
    for a, b in zip(out0, x, strict=True):  # translate 0: each image is itself or its mirror
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    flips = sum(torch.equal(a, b.flip(2)) for a, b in zip(out0, x, strict=True))
    assert 5 < flips < 35
    t = 2
    out = D.translate_and_flip(x, t, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (t, t, t, t))
    padded_f = torch.nn.functional.pad(x.flip(3), (t, t, t, t))
    shifts = set()
    for i in range(len(x)):  # each output is a zero-filled shift of at most t pixels of the (mirrored) input
        match = [(f, dy, dx) for f, p in ((0, padded), (1, padded_f)) for dy in range(2 * t + 1)
                 for dx in range(2 * t + 1) if torch.equal(out[i], p[i, :, dy:dy + 32, dx:dx + 32])]
        assert match, i
        shifts.add(match[0][1:])
    assert len(shifts) > 5  # the shifts vary


def test_augmented_loader_is_deterministic_per_epoch():
    x, y = torch.randn(30, 3, 32, 32), torch.arange(30)
    epoch = {"e": 0}

    def run():
        loader = D.DeviceLoader(x, y, 10, shuffle=True, augment=True, translate=2, seed=4, epoch=lambda: epoch["e"])
        return torch.cat([b[0] for b in loader])

    a = run()
    assert a.shape == (30, 3, 32, 32)
    assert torch.equal(a, run())
    epoch["e"] = 1
    assert not torch.equal(a, run())

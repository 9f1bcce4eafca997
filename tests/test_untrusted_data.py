"""Data files and caches from outside are data, never code: crafted pickles run nothing, bad whitening caches
are refitted, arrays files whose headers lie are refused before anything is allocated."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from allconv import cifar_files as F
from allconv import data as D
from allconv import preprocessing as pp
from allconv import safe_pickle
from conftest import TINY, only_line, run_cli, write_npz, write_official
from test_files import Disk

# -- pickles that would run code -----------------------------------------------------------------------------

PAYLOADS = {  # what each crafted pickle calls to create the marker file
    "os.system": lambda marker: (os.system, (f"touch '{marker}'",)),
    "builtins.exec": lambda marker: (exec, (f"open({str(marker)!r}, 'w').close()",)),
    "builtins.open": lambda marker: (open, (str(marker), "w")),
}
# the globals as protocol 2 names them (Python 2's module names), which is what the refusal quotes
PICKLED_AS = {"os.system": "posix.system", "builtins.exec": "__builtin__.exec", "builtins.open": "io.open"}


class Payload:
    """Unpickled with plain pickle, it calls PAYLOADS[call], which creates marker."""

    def __init__(self, call: str, marker: Path):
        self.call, self.marker = call, marker

    def __reduce__(self):
        return PAYLOADS[self.call](self.marker)


def _plant(path: Path, payload: Payload) -> None:
    """Rewrite an official-format file with the payload inside its dict, beside the genuine content."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["batch_label"] = payload
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.mark.parametrize("call", sorted(PAYLOADS))
def test_payloads_run_under_plain_pickle(tmp_path, call):
    """The payloads below are live: plain pickle.load runs them (so their markers prove a leak)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"x": Payload(call, marker)}, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("name,fname", [("cifar10", "data_batch_3"), ("cifar10", "test_batch"),
                                        ("cifar10", "batches.meta"), ("cifar100", "train"), ("cifar100", "meta")])
@pytest.mark.parametrize("call", sorted(PAYLOADS))
def test_crafted_official_file_runs_nothing_and_is_one_line(tmp_path, make_official, name, fname, call):
    root, _ = make_official(name)
    path = root / F.OFFICIAL[name][0] / fname
    marker = tmp_path / "ran"
    payload = Payload(call, marker)
    _plant(path, payload)
    with pytest.raises(D.DataError) as e:
        F.load_official(name, root, verify_md5=False)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and PICKLED_AS[call] in msg and "refused" in msg
    assert not marker.exists()


@pytest.mark.subprocess
def test_crafted_data_batch_through_the_cli_exits_2_with_one_line(tmp_path):
    root = tmp_path / "cifar"
    write_official(root, "cifar10")
    path = root / "cifar-10-batches-py" / "data_batch_2"
    marker = tmp_path / "ran"
    _plant(path, Payload("os.system", marker))
    rc, _, err = run_cli("data=cifar10", f"data.root={root}", "data.download=false", "data.verify_md5=false",
                         *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = only_line(err)
    assert rc == 2 and str(path) in line and "posix.system" in line, err
    assert not marker.exists()


def test_unpickler_allocates_only_what_the_file_holds(tmp_path):
    """numpy's constructors, called with a shape of the file's choosing, would allocate a terabyte."""
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]

    class Huge:
        def __init__(self, how):
            self.how = how

        def __reduce__(self):
            if self.how == "ndarray":
                return np.ndarray, ((10 ** 12,), "u1")
            return reconstruct, (np.ndarray, (10 ** 12,), b"b")

    refusal = {"ndarray": "numpy.ndarray may only be named as the type rebuilt by _reconstruct",
               "_reconstruct": r"allowed: ndarray with shape \(0,\)"}
    for how in ("ndarray", "_reconstruct"):
        path = tmp_path / how
        path.write_bytes(pickle.dumps({"data": Huge(how), "labels": []}, protocol=2))
        with pytest.raises(D.DataError, match=f"not a CIFAR file .*UnpicklingError: .*{refusal[how]}") as e:
            F.read_cifar_batch(path, "labels")
        assert "\n" not in str(e.value)


# -- what the official format does need ---------------------------------------------------------------------

def _py2_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """{'data': rows, 'labels': labels} as Python 2's cPickle (protocol 2) with numpy 1.x wrote the official files:
    bytes as str (BINSTRING), numpy under its numpy.core names."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R" \
        + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R" \
        + b"(" + i(1) + i(len(rows)) + i(rows.shape[1]) + b"\x86" + dtype + b"\x89" + s(rows.tobytes()) + b"tb"
    out = b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"eu."
    pickletools.dis(out, out=io.StringIO())  # a well-formed pickle, or this raises
    return out


def test_python2_official_format_reads(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, size=(3, 3072)).astype(np.uint8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(_py2_pickle(rows, [1, 0, 9]))
    x, y = F.read_cifar_batch(path, "labels", 10)
    np.testing.assert_array_equal(x, rows.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))
    assert y.tolist() == [1, 0, 9] and y.dtype == np.int64


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_of_plain_data_reads(tmp_path, protocol):
    rows = np.random.default_rng(protocol).integers(0, 256, size=(4, 3072)).astype(np.uint8)
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({"data": rows, "labels": [0, 1, 2, 3], "filenames": ["a.png"] * 4,
                                   "batch_label": "x"}, protocol=protocol))
    x, y = F.read_cifar_batch(path, "labels", 10)
    np.testing.assert_array_equal(x, rows.reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))
    assert y.tolist() == [0, 1, 2, 3]
    meta = tmp_path / "m"
    meta.write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)], "num_vis": 3072}, protocol=protocol))
    assert F.read_cifar_meta(meta, "label_names", 10) == [f"c{k}" for k in range(10)]


def test_safe_unpickler_refuses_globals_beyond_plain_data(tmp_path):
    """A harmless-looking global is refused too: the admitted set is closed, not a list of known dangers."""
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [np.int64(1)]}, protocol=2))
    with pytest.raises(safe_pickle.RefusedGlobal, match="numpy._core.multiarray.scalar"):
        safe_pickle.load(path)
    with pytest.raises(D.DataError, match="scalar"):
        F.read_cifar_batch(path, "labels")


# -- the structure of the official files ---------------------------------------------------------------------

ROWS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize("entry,match", [
    ([ROWS, [0, 1]], "holds list"),
    ({"labels": [0, 1]}, "lacks the key 'data'"),
    ({"data": ROWS}, "lacks the key 'labels'"),
    ({"data": ROWS.astype(np.float32), "labels": [0, 1]}, "float32"),
    ({"data": ROWS[:, :1024], "labels": [0, 1]}, r"\(2, 1024\)"),
    ({"data": ROWS.tolist(), "labels": [0, 1]}, "'data' .* is list"),
    ({"data": ROWS, "labels": np.array([0, 1])}, "allowed: a list of ints"),
    ({"data": ROWS, "labels": ["0", "1"]}, "non-int items"),
    ({"data": ROWS, "labels": [0, 1, 2]}, "3 labels"),
    ({"data": ROWS, "labels": [0, 10]}, "label 10; allowed: 0..9"),
    ({"data": ROWS, "labels": [-1, 0]}, "label -1"),
])
def test_malformed_batch_is_one_line(tmp_path, entry, match):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(D.DataError, match=match) as e:
        F.read_cifar_batch(path, "labels", 10)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("name,meta,match", [
    ("cifar10", ["airplane"] * 10, "holds list"),
    ("cifar10", {"label_names": ["a"] * 9}, "of 9 items"),
    ("cifar10", {"label_names": list(range(10))}, "10 class names"),
    ("cifar100", {"coarse_label_names": ["a"] * 20}, "'fine_label_names' as NoneType"),
])
def test_malformed_meta_is_one_line(make_official, name, meta, match):
    root, _ = make_official(name)
    path = root / F.OFFICIAL[name][0] / F.OFFICIAL[name][4]
    path.write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(D.DataError, match=match) as e:
        F.load_official(name, root, verify_md5=False)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_meta_file_is_md5_checked(make_official, monkeypatch):
    root, _ = make_official("cifar10")
    ds = F._torchvision_dataset("cifar10")
    base = root / "cifar-10-batches-py"
    # the batches are these small files, so their md5s are made the official ones; the meta file stays foreign
    for attr in ("train_list", "test_list"):
        monkeypatch.setattr(ds, attr, [[f, F._md5(base / f)] for f, _ in getattr(ds, attr)])
    with pytest.raises(D.DataError, match="batches.meta fails its md5 check"):
        F.load_official("cifar10", root, verify_md5=True)
    monkeypatch.setattr(ds, "meta", {**ds.meta, "md5": F._md5(base / "batches.meta")})
    assert F.load_official("cifar10", root, verify_md5=True)["classes"][0] == "name0"


# -- the whitening cache --------------------------------------------------------------------------------------

KEY = "0123456789abcdef"


def _x(seed: int = 0) -> torch.Tensor:
    """GCN'd rows of a small dimension: the fit is instant."""
    return pp.global_contrast_normalize(torch.rand(80, 48, generator=torch.Generator().manual_seed(seed)) * 255)


def _genuine(cache: Path, x: torch.Tensor) -> dict:
    pp.fit_zca_cached(x, KEY, cache)
    return torch.load(cache / f"zca-{KEY}.pt", weights_only=True)


def _bad(case: str, state: dict, tmp_path: Path):
    """The bytes or the state of a bad cache file."""
    P, mean = state["P"], state["mean"]
    return {
        "P = 0": {**state, "P": torch.zeros_like(P)},
        "P negative definite": {**state, "P": -P},
        "P 10x10": {**state, "P": torch.eye(10, dtype=P.dtype)},
        "P NaN": {**state, "P": P.clone().fill_(float("nan"))},
        "P integer": {**state, "P": P.long()},
        "P asymmetric": {**state, "P": P + torch.triu(torch.ones_like(P), 1)},
        "P too large": {**state, "P": 10 * P},
        "other data's fit": {**pp.ZCA().fit(_x(1)).state_dict(), "key": KEY},
        "another key": {**state, "key": "fedcba9876543210"},
        "no key": {k: v for k, v in state.items() if k != "key"},
        "other filter_bias": {**state, "filter_bias": 0.5},
        "not a dict": [P, mean],
        "truncated": pp.torch_bytes(state)[:1000],
        "garbage": b"not a torch file",
        "pickle payload": pp.torch_bytes({**state, "P": Payload("os.system", tmp_path / "ran")}),
    }[case]


BAD = {"P = 0": "P is not positive definite", "P negative definite": "P is not positive definite",
       "P 10x10": r"P is torch.float64 \(10, 10\), expected floating point \(48, 48\)", "P NaN": "P is not finite",
       "P integer": "P is torch.int64", "P asymmetric": "P is not symmetric",
       "P too large": r"P has an eigenvalue above 1/sqrt\(filter_bias\)",
       "other data's fit": "mean is not the training data's mean",
       "another key": "key 'fedcba9876543210', expected '0123456789abcdef'", "no key": "it records no key",
       "other filter_bias": "filter_bias 0.5, expected 0.1", "not a dict": "holds list, not a dict",
       "truncated": "unreadable", "garbage": "unreadable", "pickle payload": "unreadable: UnpicklingError"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_whitening_cache_is_refitted_and_replaced_with_one_warning(tmp_path, capsys, case):
    import re

    x, cache = _x(), tmp_path / "zca"
    bad = _bad(case, _genuine(cache, x), tmp_path)
    path = cache / f"zca-{KEY}.pt"
    path.write_bytes(bad if isinstance(bad, bytes) else pp.torch_bytes(bad))
    capsys.readouterr()
    zca, loaded = pp.fit_zca_cached(x, KEY, cache)
    clean = pp.ZCA().fit(x)
    assert not loaded and torch.equal(zca.P, clean.P) and torch.equal(zca.mean, clean.mean)
    line = only_line(capsys.readouterr().err)
    assert re.fullmatch(rf"warning: ZCA cache {re.escape(str(path))} is not a valid fit \(.*\); refitted and replaced",
                        line), line
    assert re.search(BAD[case], line), line
    assert not (tmp_path / "ran").exists()
    # replaced by the valid fit: the next run loads it, silently
    zca2, loaded2 = pp.fit_zca_cached(x, KEY, cache)
    assert loaded2 and torch.equal(zca2.P, clean.P) and capsys.readouterr().err == ""
    assert sorted(p.name for p in cache.iterdir()) == [f"zca-{KEY}.lock", f"zca-{KEY}.pt"]


def test_genuine_cache_records_its_key_and_loads_in_float32_too(tmp_path, capsys):
    x, cache = _x(), tmp_path / "zca"
    state = _genuine(cache, x)
    assert state["key"] == KEY
    # a fit rounded to float32 is still a fit: the checks' tolerances allow it
    path = cache / f"zca-{KEY}.pt"
    path.write_bytes(pp.torch_bytes({**state, "P": state["P"].float(), "mean": state["mean"].float()}))
    capsys.readouterr()
    zca, loaded = pp.fit_zca_cached(x, KEY, cache)
    assert loaded and zca.P.dtype == torch.float32 and capsys.readouterr().err == ""


def test_bad_cache_in_an_unwritable_folder_trains_on_with_one_line(tmp_path, monkeypatch, capsys):
    x = _x()
    disk = Disk(tmp_path / "disk", False, monkeypatch)
    (tmp_path / "disk").mkdir()
    state = _genuine(disk.path, x)
    path = disk.path / f"zca-{KEY}.pt"
    bad = pp.torch_bytes({**state, "P": torch.zeros_like(state["P"])})
    path.write_bytes(bad)
    disk.read_only()
    capsys.readouterr()
    zca, loaded = pp.fit_zca_cached(x, KEY, disk.path)
    assert not loaded and torch.equal(zca.P, pp.ZCA().fit(x).P)
    assert only_line(capsys.readouterr().err) == (
        f"warning: ZCA cache {path} is not a valid fit (P is not positive definite); refitted, but cannot write "
        f"{path}: Read-only file system (EROFS); the whitening fit is used from memory")
    assert path.read_bytes() == bad and disk.temporaries() == []


def test_datamodule_trains_on_a_clean_fit_despite_a_bad_cache(tmp_path, capsys):
    npz = write_npz(tmp_path / "tiny.npz", n_train=40, n_test=8)
    raw = F.load_npz(npz, 10)
    key = pp.fingerprint(raw["x_train"], gcn_scale=55.0, filter_bias=0.1)
    bad_cache, clean_cache = tmp_path / "bad", tmp_path / "clean"
    bad_cache.mkdir()
    d = 3072
    bad = {"version": pp.CACHE_VERSION, "key": key, "filter_bias": 0.1,
           "mean": torch.zeros(d, dtype=torch.float64), "P": torch.zeros(d, d, dtype=torch.float64)}
    (bad_cache / f"zca-{key}.pt").write_bytes(pp.torch_bytes(bad))
    dm = D.CIFARDataModule(source="npz", path=str(npz), cache_dir=str(bad_cache))
    dm.setup("fit")
    assert "is not a valid fit" in only_line(capsys.readouterr().err) and dm.zca_from_cache is False
    clean = D.CIFARDataModule(source="npz", path=str(npz), cache_dir=str(clean_cache))
    clean.setup("fit")
    for k in ("x_train", "x_test"):
        assert torch.equal(dm.tensors[k], clean.tensors[k])


# -- arrays files whose headers lie -----------------------------------------------------------------------------

def _declare(path: Path, member: str, shape: tuple) -> Path:
    """Rewrite the header of one .npy member of path to declare shape, keeping the member's data bytes."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        members = {i.filename: z.read(i) for i in infos}
    f = io.BytesIO(members[member])
    np.lib.format.read_magic(f)
    _, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                "fortran_order": fortran, "shape": shape})
    members[member] = head.getvalue() + members[member][f.tell():]
    with zipfile.ZipFile(path, "w") as z:
        for info in infos:
            z.writestr(info.filename, members[info.filename], compress_type=info.compress_type)
    return path


@pytest.mark.parametrize("member,shape", [
    ("x_test.npy", (20_000_000, 32, 32, 3)),
    ("x_train.npy", (1, 32, 32, 3)),
    ("y_train.npy", (10 ** 9,)),
    ("classes.npy", (10 ** 10,)),
])
def test_npz_header_inconsistent_with_the_file_is_one_line(tmp_path, member, shape):
    path = _declare(write_npz(tmp_path / "d.npz", n_train=16, n_test=8), member, shape)
    for check in (F.check_npz, F.load_npz):
        with pytest.raises(D.DataError) as e:
            check(path, 10)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and member in msg and str(shape) in msg, msg


def test_npz_checks_hold_for_compressed_files(tmp_path):
    path = tmp_path / "c.npz"
    arrays = {"x_train": np.zeros((6, 32, 32, 3), np.uint8), "y_train": np.zeros(6, np.int64),
              "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.ones(2, np.int64)}
    np.savez_compressed(path, **arrays)
    assert F.check_npz(path, 10) == 6 and F.load_npz(path, 10)["y_test"].tolist() == [1, 1]
    _declare(path, "x_test.npy", (20_000_000, 32, 32, 3))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("x_test.npy").compress_type == zipfile.ZIP_DEFLATED
    with pytest.raises(D.DataError, match=r"x_test.npy .* declares shape \(20000000, 32, 32, 3\)"):
        F.check_npz(path, 10)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_member_size_beyond_the_file_is_one_line(tmp_path, method):
    """The zip's directory, not only the .npy header, may lie about a member's size: it must fit the file."""
    path = tmp_path / "d.npz"
    arrays = {"x_train": np.zeros((6, 32, 32, 3), np.uint8), "y_train": np.zeros(6, np.int64),
              "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.ones(2, np.int64)}
    (np.savez if method == zipfile.ZIP_STORED else np.savez_compressed)(path, **arrays)
    _declare(path, "x_test.npy", (20_000_000, 32, 32, 3))
    raw = bytearray(path.read_bytes())
    record = raw.find(b"PK\x01\x02")  # the central directory's records, each with the member's sizes
    while raw[record + 46:record + 46 + len(b"x_test.npy")] != b"x_test.npy":
        record = raw.find(b"PK\x01\x02", record + 1)
    raw[record + 24:record + 28] = struct.pack("<I", 0xFFFFFF00)  # the uncompressed size: about 4 GiB
    path.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match=r"x_test.npy .* claims \d+ bytes, more than the \d+-byte file holds") as e:
        F.check_npz(path, 10)
    assert "\n" not in str(e.value)


def test_npz_object_member_is_one_line(tmp_path):
    path = write_npz(tmp_path / "o.npz", n_train=8, n_test=4, classes=np.array(["a", 1], dtype=object))
    for check in (F.check_npz, F.load_npz):
        with pytest.raises(D.DataError, match="classes.npy .* holds Python objects") as e:
            check(path, 10)
        assert "\n" not in str(e.value)


@pytest.mark.subprocess
@pytest.mark.parametrize("case,match", [
    ("huge", r"x_test\.npy .* declares shape \(20000000, 32, 32, 3\)"),
    ("no_test", r"x_test .* holds no images"),
    ("no_train", r"x_train .* holds no images"),
])
def test_bad_npz_through_the_cli_exits_2_before_a_run_folder(tmp_path, case, match):
    import re

    path = tmp_path / "d.npz"
    empty = {"x": np.zeros((0, 32, 32, 3), np.uint8), "y": np.zeros(0, np.int64)}
    if case == "huge":
        _declare(write_npz(path, n_train=16, n_test=8), "x_test.npy", (20_000_000, 32, 32, 3))
    elif case == "no_test":
        write_npz(path, n_train=16, x_test=empty["x"], y_test=empty["y"])
    else:
        write_npz(path, n_test=8, x_train=empty["x"], y_train=empty["y"])
    run_dir = tmp_path / "run"
    rc, _, err = run_cli("data=npz", f"data.path={path}", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    line = only_line(err)
    assert rc == 2 and re.search(match, line) and str(path) in line, err
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()

"""The CIFAR files as they come from elsewhere: the official python archives and .npz arrays files.

The official CIFAR-10/100 archives are downloaded and md5-checked through torchvision and read by our own reader,
so small files in the official format work too; they are unpickled by allconv.safe_pickle (plain data only) and
their structure checked. An arrays file (x_train, y_train, x_test, y_test; uint8 NHWC), such as the JPEG copy of
CIFAR-10 decoded by shared/data/cifar10_jpeg_to_arrays.py, or CIFAR-10.1, has its headers checked against its
size and this machine's memory before any array is allocated, and its class names against data.num_classes.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from allconv import safe_pickle
from allconv.errors import DataError
from allconv.files import file_kind

OFFICIAL = {
    # name: (folder, train files, test files, label key, meta file, meta key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names", 100),
}
PREPROCESS = ("gcn_zca", "standardize", "none")


def _torchvision_dataset(name: str):
    import torchvision.datasets as tvd

    return tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpickle(path: Path):
    """The one object of an official-format file, through the restricted unpickler; DataError otherwise."""
    try:
        return safe_pickle.load(path)
    except safe_pickle.RefusedGlobal as e:
        raise DataError(f"{path} is not a CIFAR file in the official python format: it names the global {e}, "
                        f"which is refused (allowed: dicts, lists, numbers, strings and numpy arrays)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    except Exception as e:  # anything a malformed pickle raises (EOFError, UnpicklingError, ValueError, ...)
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"{path} is not a CIFAR file in the official python format ({type(e).__name__}"
                        f"{': ' + detail if detail else ''})") from None


def _type_name(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__


def read_cifar_batch(path: Path, label_key: str, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One file of the official python format: a pickled dict with 'data' (N, 3072) uint8, CHW rows, and
    label_key a list of N ints (in 0..num_classes-1 when given)."""
    entry = _unpickle(path)
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds {_type_name(entry)}; a CIFAR batch file holds a dict with 'data' and "
                        f"{label_key!r}")
    for key in ("data", label_key):
        if key not in entry:
            raise DataError(f"{path} lacks the key {key!r}; a CIFAR batch file holds a dict with 'data' and "
                            f"{label_key!r}")
    data, labels = entry["data"], entry[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"'data' in {path} is {_type_name(data)}; allowed: a uint8 array of shape (N, 3072)")
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise DataError(f"{label_key!r} in {path} is {_type_name(labels)}"
                        f"{' with non-int items' if isinstance(labels, list) else ''}; allowed: a list of ints")
    if len(labels) != len(data):
        raise DataError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {len(labels)} labels")
    y = np.asarray(labels, dtype=np.int64)
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{label_key!r} in {path} holds label {bad}; allowed: 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def read_cifar_meta(path: Path, meta_key: str, num_classes: int) -> list[str]:
    """The class names of the official meta file: a pickled dict whose meta_key is num_classes strings."""
    meta = _unpickle(path)
    names = meta.get(meta_key) if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(c, str) for c in names)):
        what = _type_name(meta) if not isinstance(meta, dict) else \
            f"{meta_key!r} as {_type_name(names)}" + (f" of {len(names)} items" if isinstance(names, list) else "")
        raise DataError(f"{path} holds {what}; a CIFAR meta file holds a dict with {meta_key!r} a list of "
                        f"{num_classes} class names")
    return list(names)


def load_official(name: str, root: str | Path, verify_md5: bool = True) -> dict:
    """Read CIFAR-10/100 from root/<official folder>, optionally checking each file's md5.

    Every file goes through the restricted unpickler whether or not its md5 was checked.
    """
    folder, train_files, test_files, label_key, meta_file, meta_key, n_classes = OFFICIAL[name]
    base = Path(root) / folder
    ds = _torchvision_dataset(name)
    md5s = dict(ds.train_list + ds.test_list) | {meta_file: ds.meta["md5"]}

    def checked(path: Path) -> Path:
        if verify_md5 and _md5(path) != md5s[path.name]:
            raise DataError(f"{path} fails its md5 check (expected {md5s[path.name]}); "
                            f"delete it and set data.download=true")
        return path

    splits = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for fname in files:
            path = base / fname
            if not path.is_file():
                raise DataError(f"missing {path}; set data.download=true or point data.root at a folder "
                                f"holding {folder}/")
            x, y = read_cifar_batch(checked(path), label_key, n_classes)
            xs.append(x)
            ys.append(y)
        splits[f"x_{split}"], splits[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    meta = base / meta_file
    # the names only label figures, so a folder without the meta file still trains (numbered classes)
    classes = read_cifar_meta(checked(meta), meta_key, n_classes) if meta.is_file() else \
        [str(i) for i in range(n_classes)]
    return {**splits, "classes": classes}


def download_official(name: str, root: str | Path) -> None:
    """Download and extract the official archive (md5-checked by torchvision) unless already present."""
    folder = OFFICIAL[name][0]
    if (Path(root) / folder).is_dir():
        return
    from torchvision.datasets.utils import download_and_extract_archive

    ds = _torchvision_dataset(name)
    try:
        download_and_extract_archive(ds.url, str(root), filename=ds.filename, md5=ds.tgz_md5)
    except (RuntimeError, OSError) as e:  # md5 mismatch ("File not found or corrupted."), network, disk
        archive = Path(root) / ds.filename
        if archive.is_file() and _md5(archive) != ds.tgz_md5:
            archive.unlink()  # a bad download must not be mistaken for the archive next time
        raise DataError(f"download of {ds.url} into data.root {str(root)!r} failed its md5 check or did not "
                        f"complete ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                        f"check the network, or put {folder}/ into data.root and set data.download=false") from None


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DEFLATE_MAX_RATIO = 1032  # no deflate stream inflates more than this: a bound on what a member's bytes can hold


def _npz_error(path: Path, e: Exception) -> DataError:
    return DataError(f"data.path {str(path)!r} is not a readable .npz arrays file ({type(e).__name__}); "
                     f"expected an .npz with x_train, y_train, x_test, y_test")


def _npz_read(path: Path, read: Callable):
    """read(), with what a malformed zip or .npy raises turned into the one-line DataError."""
    try:
        return read()
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _npz_error(path, e) from None


def _npz_headers(path: Path) -> dict:
    """key -> (shape, dtype) of every .npy member, from its header alone.

    Each header's declared size must be what the member holds and what the file's bytes can hold, so
    that np.load, which allocates the declared shape before it reads, never allocates more than the file.
    """
    on_disk = path.stat().st_size
    headers = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            where = f"member {info.filename} of data.path {str(path)!r}"
            if info.compress_type == zipfile.ZIP_STORED:
                can_hold = info.compress_size
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                can_hold = info.compress_size * _DEFLATE_MAX_RATIO + 1024
            else:
                raise DataError(f"{where} is compressed with zip method {info.compress_type}; "
                                f"allowed: stored or deflated, as numpy.savez and savez_compressed write")
            if info.header_offset + info.compress_size > on_disk or info.file_size > can_hold:
                raise DataError(f"{where} claims {info.file_size} bytes, more than the {on_disk}-byte file holds; "
                                f"the file is truncated or not an arrays file")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                header_bytes = f.tell()
            if dtype.hasobject:
                raise DataError(f"{where} holds Python objects (dtype {dtype}), which only pickle can read; "
                                f"allowed: numeric and string arrays")
            declared = header_bytes + int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared != info.file_size:
                raise DataError(f"{where} declares shape {tuple(shape)} {dtype} ({declared} bytes with its header) "
                                f"but holds {info.file_size} bytes; the file is truncated or its header is wrong")
            headers[info.filename.removesuffix(".npy")] = (shape, dtype)
    return headers


def _npz_members(path: Path, keys) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in keys}


def _check_npz_exists(path: Path) -> None:
    if not path.is_file():
        what = f"is {file_kind(path.stat().st_mode)}" if path.exists() else "does not exist"
        raise DataError(f"data.path {str(path)!r} {what}; expected an .npz with x_train, y_train, x_test, y_test")


def _check_arrays(path: Path, shapes: dict, labels: dict, num_classes: int) -> None:
    """shapes: key -> (shape, dtype) of x_*/y_*; labels: split -> y array, where read. One DataError for the first
    fault."""
    missing = [k for k in NPZ_KEYS if k not in shapes]
    if missing:
        raise DataError(f"data.path {str(path)!r} lacks {', '.join(missing)}; needs x_train, y_train, x_test, y_test")
    for split in ("train", "test"):
        (xs, xd), (ys, yd) = shapes[f"x_{split}"], shapes[f"y_{split}"]
        if xd != np.uint8:
            raise DataError(f"x_{split} in {str(path)!r} has dtype {xd}; allowed: uint8 (0..255)")
        if len(xs) != 4 or tuple(xs[1:]) != (32, 32, 3):
            raise DataError(f"x_{split} in {str(path)!r} has shape {tuple(xs)}; allowed: (N, 32, 32, 3) NHWC")
        if xs[0] == 0:
            raise DataError(f"x_{split} in {str(path)!r} holds no images (shape {tuple(xs)}); "
                            f"a run needs at least one {split} image")
        if len(ys) != 1 or ys[0] != xs[0] or not np.issubdtype(yd, np.integer):
            raise DataError(f"y_{split} in {str(path)!r} has shape {tuple(ys)} {yd}; allowed: ({xs[0]},) integers")
        y = labels.get(split)
        if y is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(f"y_{split} in {str(path)!r} holds label {bad}; allowed: 0..{num_classes - 1} "
                            f"(data.num_classes={num_classes})")


def _memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_classes_and_size(path: Path, shapes: dict, num_classes: int) -> None:
    """From the headers: `classes`, when present, is num_classes strings, and the arrays a run reads fit in memory.

    np.load allocates what a header declares before it reads a byte; the file's size bounds that only to about
    a thousand times itself (deflate), so a 100 MB file could still ask for 100 GB."""
    if "classes" in shapes:
        shape, dtype = shapes["classes"]
        if tuple(shape) != (num_classes,) or dtype.kind not in "US":
            raise DataError(f"classes in {str(path)!r} has shape {tuple(shape)} {dtype}; allowed: ({num_classes},) "
                            f"strings, one name per class (data.num_classes={num_classes})")
    declared = {k: int(np.prod(shapes[k][0], dtype=object)) * shapes[k][1].itemsize
                for k in (*NPZ_KEYS, "classes") if k in shapes}
    memory = _memory_bytes()
    if sum(declared.values()) > memory:
        biggest = max(declared, key=declared.get)
        raise DataError(f"data.path {str(path)!r} declares {sum(declared.values()) / 1e9:.1f} GB of arrays "
                        f"({biggest} {tuple(shapes[biggest][0])} {shapes[biggest][1]}), more than this machine's "
                        f"{memory / 1e9:.1f} GB of memory (CIFAR-10 takes 0.18 GB); refused before loading")


def check_npz(path: str | Path, num_classes: int) -> int:
    """Validate an arrays file from its headers and labels, without reading the images; returns n_train."""
    path = Path(path)
    _check_npz_exists(path)
    shapes = _npz_read(path, lambda: _npz_headers(path))
    _check_arrays(path, shapes, {}, num_classes)  # before the labels are read: their headers are sound
    _check_classes_and_size(path, shapes, num_classes)
    labels = _npz_read(path, lambda: _npz_members(path, ("y_train", "y_test")))  # a few hundred kB
    _check_arrays(path, shapes, {"train": labels["y_train"], "test": labels["y_test"]}, num_classes)
    return shapes["x_train"][0][0]


def load_npz(path: str | Path, num_classes: int) -> dict:
    """Read and validate an arrays file: x_* uint8 (N, 32, 32, 3), y_* integers in [0, num_classes)."""
    path = Path(path)
    _check_npz_exists(path)
    shapes = _npz_read(path, lambda: _npz_headers(path))
    _check_arrays(path, shapes, {}, num_classes)
    _check_classes_and_size(path, shapes, num_classes)
    keys = [*NPZ_KEYS, *(["classes"] if "classes" in shapes else [])]
    arrays = _npz_read(path, lambda: _npz_members(path, keys))
    _check_arrays(path, shapes, {s: arrays[f"y_{s}"] for s in ("train", "test")}, num_classes)
    for split in ("train", "test"):
        arrays[f"y_{split}"] = arrays[f"y_{split}"].astype(np.int64)
    classes = [c.decode("latin-1") if isinstance(c, bytes) else str(c) for c in arrays["classes"].tolist()] \
        if "classes" in arrays else [str(i) for i in range(num_classes)]
    return {k: arrays[k] for k in NPZ_KEYS} | {"classes": classes}


def _check_writable(root: Path) -> None:
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):  # a file on the path blocks mkdir too
        raise DataError(f"data.root {str(root)!r} cannot be written (download needs a writable folder)")

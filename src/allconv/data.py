"""CIFAR for the paper: sources, the LightningDataModule, and the device-resident loader.

Sources: the official CIFAR-10/100 python archives (downloaded and md5-checked through
torchvision, read by our own reader so small files in the official format work too) or an .npz
arrays file (x_train, y_train, x_test, y_test; uint8 NHWC), such as the JPEG copy of CIFAR-10
decoded by shared/data/cifar10_jpeg_to_arrays.py, or CIFAR-10.1. Both are outside data: the official
files are unpickled by allconv.safe_pickle (plain data only, md5-checked or not) and their structure
checked; an arrays file's headers are checked against its size and this machine's memory before any
array is allocated, and its class names against data.num_classes.

As in airbench, the whole preprocessed dataset lives on the training device as one tensor: a batch
is an index slice of a device-side permutation, and flips/translations are tensor ops on the
device. No worker processes, no per-step host-to-device copies. The same code runs on the CPU.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch

from allconv import preprocessing as pp
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


def translate_and_flip(x: torch.Tensor, translate: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and translations of up to `translate` pixels, zero-filled, on x's device.

    Zero is the mean of whitened data, so the revealed border is "no signal".
    """
    n, _, h, w = x.shape
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if translate <= 0:
        return x
    t = translate
    padded = torch.nn.functional.pad(x, (t, t, t, t))
    dy = torch.randint(0, 2 * t + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * t + 1, (n,), device=x.device, generator=generator)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]  # (n,1,h,1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]  # (n,1,1,w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


class DeviceLoader:
    """Batches from tensors already on the device: index slices of a permutation, augmentation as tensor ops.

    Under DDP each rank takes its own shard (rank::world_size) of one permutation shared by all
    ranks (same seed and epoch). Training shards are cut to equal length so ranks step together.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, augment: bool = False, translate: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, epoch: Callable[[], int] | None = None):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.translate, self.seed = augment, translate, seed
        self.rank, self.world_size = rank, world_size
        self._epoch = epoch or (lambda: 0)
        self._served, self._serving, self._gen, self._resume = 0, None, None, None

    def state_dict(self) -> dict:
        """Where the epoch being served stands; Lightning keeps it in the checkpoint of a run stopped mid-epoch.

        The epoch is the one these batches were drawn for, not the trainer's: a checkpoint written after an
        epoch has begun and before its first batch (a DDP stop at step 0) still holds the previous epoch's
        count, which must not apply to the new one.
        """
        return {"epoch": self._serving, "served": self._served,
                "generator": self._gen.get_state() if self._gen is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state  # applied by the next __iter__ of that epoch: the rest of it, same draws

    def _indices(self) -> torch.Tensor:
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self._epoch())
            order = torch.randperm(n, generator=g).to(self.x.device)
            order = order[: n - n % self.world_size]  # equal shards
        else:
            order = torch.arange(n, device=self.x.device)
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self.x)
        per_rank = n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: nothing below runs (and no resume state is used up) until the first batch is asked for,
        # so Lightning's own iter() checks leave it alone.
        epoch, idx = self._epoch(), self._indices()
        resume, self._resume = self._resume, None
        start = resume["served"] if resume and resume["epoch"] == epoch else 0
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.x.device).manual_seed(self.seed * 7919 + epoch * 31 + self.rank)
            if start:
                gen.set_state(resume["generator"])
        self._gen, self._served, self._serving = gen, start, epoch
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.x[sel]
            if self.augment:
                x = translate_and_flip(x, self.translate, gen)
            self._served = b + 1
            yield x, self.y[sel]


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10/100 or an arrays file -> GCN + ZCA (or standardize / none) -> device-resident loaders."""

    def __init__(self, source: str = "cifar10", root: str = "data", path: str | None = None,
                 download: bool = True, verify_md5: bool = True, num_classes: int = 10,
                 preprocess: str = "gcn_zca", gcn_scale: float = 55.0, zca_filter_bias: float = 0.1,
                 val_size: int = 0, split_seed: int = 0, augment: bool = False, translate: int = 0,
                 batch_size: int = 128, eval_batch_size: int = 1000, on_device: bool = True,
                 drop_last: bool = False, cache_dir: str | None = None, limit_train: int | None = None,
                 limit_test: int | None = None, seed: int = 0, **_ignored):
        super().__init__()
        self.source, self.root, self.path = source, Path(root).expanduser(), path
        self.download, self.verify_md5, self.num_classes = download, verify_md5, num_classes
        self.preprocess, self.gcn_scale, self.zca_filter_bias = preprocess, gcn_scale, zca_filter_bias
        self.val_size, self.split_seed = val_size, split_seed
        self.augment, self.translate = augment, translate
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.on_device, self.drop_last, self.seed = on_device, drop_last, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else Path(
            os.environ.get("ALLCONV_CACHE", "~/.cache/allconv")).expanduser()
        self.limit_train, self.limit_test = limit_train, limit_test
        self._raw: dict | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.zca_from_cache: bool | None = None
        self.zca: pp.ZCA | None = None  # the whitening of this run (gcn_zca), for figures
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None  # data.preprocess=standardize: mean, std

    # -- checks that run before any training -------------------------------------------------
    def validate(self) -> None:
        """Fail fast, with one line, on every bad data setting; reads file headers and labels, not images."""
        if self.source not in ("cifar10", "cifar100", "npz"):
            raise DataError(f"unknown data.source {self.source!r}; allowed: cifar10, cifar100, npz")
        if self.preprocess not in PREPROCESS:
            raise DataError(f"unknown data.preprocess {self.preprocess!r}; allowed: {', '.join(PREPROCESS)}")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise DataError(f"data.batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.val_size, int) and self.val_size >= 0):
            raise DataError(f"data.val_size must be an integer >= 0, got {self.val_size!r}")
        if not (isinstance(self.translate, int) and 0 <= self.translate <= 16):
            raise DataError(f"data.translate must be an integer in 0..16, got {self.translate!r}")
        if self.source == "npz":
            if not self.path:
                raise DataError("data.path is not set; data=npz needs data.path=<arrays .npz>")
            n_train = check_npz(self.path, self.num_classes)
            if self.limit_train:
                n_train = min(n_train, self.limit_train)
        else:
            folder = self.root / OFFICIAL[self.source][0]
            if not self.download and not folder.is_dir():
                raise DataError(f"data.root {str(self.root)!r} holds no {OFFICIAL[self.source][0]}/ and "
                                f"data.download=false; set data.download=true or point data.root at the data")
            if self.download and not folder.is_dir():
                _check_writable(self.root)
            n_train = None  # known once the files are read; setup() checks val_size then
        if n_train is not None and self.val_size >= n_train:
            raise DataError(f"data.val_size={self.val_size} must be below the {n_train} training images")

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.source in OFFICIAL and self.download:
            download_official(self.source, self.root)

    def _load_raw(self) -> dict:
        if self._raw is None:
            if self.source == "npz":
                raw = load_npz(self.path, self.num_classes)
            else:
                raw = load_official(self.source, self.root, self.verify_md5)
            if self.limit_train:
                raw["x_train"], raw["y_train"] = raw["x_train"][: self.limit_train], raw["y_train"][: self.limit_train]
            if self.limit_test:
                raw["x_test"], raw["y_test"] = raw["x_test"][: self.limit_test], raw["y_test"][: self.limit_test]
            self._raw = raw
        return self._raw

    def fingerprint(self) -> str:
        """The identity of the arrays this module trains and tests on (after the limits), which a run records."""
        raw = self._load_raw()
        return pp.fingerprint(raw["x_train"], raw["y_train"], raw["x_test"], raw["y_test"])

    def inputs_fingerprint(self) -> str:
        """The arrays and every setting that decides how they become the network's inputs (the fit: fit_summary)."""
        raw = self._load_raw()
        return pp.fingerprint(raw["x_train"], raw["x_test"], preprocess=self.preprocess, gcn_scale=self.gcn_scale,
                              filter_bias=self.zca_filter_bias, val_size=self.val_size, split_seed=self.split_seed)

    def fit_summary(self) -> list[float]:
        """A few numbers that tell this run's preprocessing fit from any other (after setup): projections of the
        ZCA's mean and matrix, or the standardisation's statistics; [] when nothing is fitted."""
        if self.zca is not None:
            return pp.summary(self.zca.mean, self.zca.P)
        if self.stats is not None:
            return [float(v) for s in self.stats for v in s.flatten()]
        return []

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        raw = self._load_raw()
        x_train, y_train = raw["x_train"], raw["y_train"]
        splits = {}
        if self.val_size >= len(x_train):
            raise DataError(f"data.val_size={self.val_size} must be below the {len(x_train)} training images")
        if self.val_size:
            # The validation images are held out before the whitening fit, so they stay unseen.
            order = np.random.default_rng(self.split_seed).permutation(len(x_train))
            val, keep = order[: self.val_size], np.sort(order[self.val_size:])
            splits["val"] = (x_train[val], y_train[val])
            x_train, y_train = x_train[keep], y_train[keep]
        splits["train"] = (x_train, y_train)
        splits["test"] = (raw["x_test"], raw["y_test"])
        flat = {k: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).reshape(len(x), -1).float()
                for k, (x, _) in splits.items()}
        if self.preprocess == "gcn_zca":
            flat = {k: pp.global_contrast_normalize(v, scale=self.gcn_scale) for k, v in flat.items()}
            key = pp.fingerprint(x_train, gcn_scale=self.gcn_scale, filter_bias=self.zca_filter_bias)
            zca, self.zca_from_cache = pp.fit_zca_cached(flat["train"], key, self.cache_dir, self.zca_filter_bias)
            self.zca = zca
            flat = {k: zca.transform(v) for k, v in flat.items()}
            images = {k: v.reshape(-1, 3, 32, 32) for k, v in flat.items()}
        else:
            images = {k: v.reshape(-1, 3, 32, 32) / 255.0 for k, v in flat.items()}
            if self.preprocess == "standardize":
                mean, std = pp.standardize_stats(images["train"])
                self.stats = (mean, std)
                images = {k: (v - mean) / std for k, v in images.items()}
        for k, (_, y) in splits.items():
            self.tensors[f"x_{k}"] = images[k].contiguous()
            self.tensors[f"y_{k}"] = torch.from_numpy(y)
        self.raw_test = torch.from_numpy(np.ascontiguousarray(raw["x_test"].transpose(0, 3, 1, 2)))
        self.classes = raw["classes"]

    def _device(self) -> torch.device:
        if self.on_device and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _loader(self, split: str, train: bool) -> DeviceLoader:
        dev = self._device()
        key = f"_on_{dev}_{split}"
        if not hasattr(self, key):  # one copy per device, made once
            setattr(self, key, (self.tensors[f"x_{split}"].to(dev), self.tensors[f"y_{split}"].to(dev)))
        x, y = getattr(self, key)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        epoch = (lambda: self.trainer.current_epoch) if self.trainer else None
        if train:
            # Lightning's overfit_batches turns a DataLoader's shuffling off; this loader is no DataLoader, so here
            shuffle = not (self.trainer is not None and self.trainer.overfit_batches)
            return DeviceLoader(x, y, self.batch_size, shuffle=shuffle, drop_last=self.drop_last, augment=self.augment,
                                translate=self.translate, seed=self.seed, rank=rank, world_size=world, epoch=epoch)
        return DeviceLoader(x, y, self.eval_batch_size, rank=rank, world_size=world)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False) if self.val_size else []

    def test_dataloader(self):
        return self._loader("test", train=False)

"""CIFAR for the paper: the LightningDataModule and the device-resident loader (the files: allconv.cifar_files).

As in airbench, the whole preprocessed dataset lives on the training device as one tensor: a batch
is an index slice of a device-side permutation, and flips/translations are tensor ops on the
device. No worker processes, no per-step host-to-device copies. The same code runs on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch

from allconv import preprocessing as pp
from allconv.cifar_files import (
    OFFICIAL,
    PREPROCESS,
    _check_writable,
    check_npz,
    download_official,
    load_npz,
    load_official,
)
from allconv.errors import DataError


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

"""Shared fixtures: tiny data files in the formats allconv reads, cache dirs, the CLI as a subprocess."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CONF = REPO / "conf"
TRAIN_PY = SRC / "train.py"
VENV_PY = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """n uint8 NHWC 32x32x3 images with some structure (smooth blobs plus noise), so GCN/ZCA are well defined."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float64)
    smooth = base.repeat(4, axis=1).repeat(4, axis=2)
    noise = rng.normal(0, 20, size=(n, 32, 32, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def write_npz(path: Path, n_train: int = 64, n_test: int = 32, num_classes: int = 10, seed: int = 0,
              **replace) -> Path:
    """An arrays file as cifar10_jpeg_to_arrays.py writes it; keyword arguments replace (or add) arrays."""
    rng = np.random.default_rng(seed + 1)
    arrays = {
        "x_train": random_images(n_train, seed),
        "y_train": rng.integers(0, num_classes, size=n_train).astype(np.int64),
        "x_test": random_images(n_test, seed + 100),
        "y_test": rng.integers(0, num_classes, size=n_test).astype(np.int64),
        "classes": np.array([f"class{i}" for i in range(num_classes)]),
    }
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def make_npz(tmp_path):
    """make_npz(name="data.npz", n_train=64, n_test=32, num_classes=10, seed=0, **arrays) -> path in tmp_path."""

    def make(name: str = "data.npz", **kwargs) -> Path:
        return write_npz(tmp_path / name, **kwargs)

    return make


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_official(root: Path, name: str = "cifar10", n_per_file: int = 6, n_test: int = 8, seed: int = 0) -> dict:
    """Small files in the official CIFAR python format under root/<official folder>/.

    Returns what was written, as NHWC uint8 arrays x_train/y_train/x_test/y_test plus classes.
    """
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, train_files, test_files, label_key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], "labels"
        n_classes, meta_file, meta_key = 10, "batches.meta", "label_names"
    else:
        folder, train_files, test_files, label_key = "cifar-100-python", ["train"], ["test"], "fine_labels"
        n_classes, meta_file, meta_key = 100, "meta", "fine_label_names"
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, files, n in (("train", train_files, n_per_file), ("test", test_files, n_test)):
        xs, ys = [], []
        for fname in files:
            x = random_images(n, int(rng.integers(1 << 30)))  # NHWC
            y = rng.integers(0, n_classes, size=n)
            rows = x.transpose(0, 3, 1, 2).reshape(n, 3072)  # official rows: R plane, G plane, B plane
            entry = {"batch_label": fname, "data": rows, label_key: [int(v) for v in y],
                     "filenames": [f"img{i}.png" for i in range(n)]}
            if name == "cifar100":
                entry["coarse_labels"] = [int(v) // 5 for v in y]
            _pickle(base / fname, entry)
            xs.append(x)
            ys.append(y)
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    classes = [f"name{i}" for i in range(n_classes)]
    meta = {meta_key: classes}
    if name == "cifar10":
        meta["num_cases_per_batch"] = n_per_file
    else:
        meta["coarse_label_names"] = [f"super{i}" for i in range(20)]
    _pickle(base / meta_file, meta)
    out["classes"] = classes
    return out


@pytest.fixture
def make_official(tmp_path):
    """make_official(name="cifar10", root=tmp_path/"cifar") -> (root, written arrays)."""

    def make(name: str = "cifar10", root: Path | None = None, **kwargs):
        root = Path(root) if root is not None else tmp_path / "cifar"
        return root, write_official(root, name, **kwargs)

    return make


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A ZCA cache folder inside tmp_path; also $ALLCONV_CACHE, so nothing lands in ~/.cache."""
    path = tmp_path / "zca-cache"
    monkeypatch.setenv("ALLCONV_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    """One ZCA cache for a whole session: tests on the same tiny data fit once and then load."""
    return tmp_path_factory.mktemp("zca-shared")


@pytest.fixture(scope="session", autouse=True)
def _session_cache_env(shared_cache_dir):
    """$ALLCONV_CACHE is the shared cache for every run that names no data.cache_dir (in-process and CLI):
    fits are keyed by the data, so equal tiny files are whitened once per session, never into ~/.cache."""
    before = os.environ.get("ALLCONV_CACHE")
    os.environ["ALLCONV_CACHE"] = str(shared_cache_dir)
    yield
    if before is None:
        os.environ.pop("ALLCONV_CACHE", None)
    else:
        os.environ["ALLCONV_CACHE"] = before


OFF_BY_DEFAULT = ("slow", "slurm", "system")  # long or needing a cluster: make test-system, test-slow, test-slurm


def named_tests(config) -> bool:
    """The command names test files or node ids (tests/test_resume.py, tests/test_resume.py::test_x), not only
    folders: the user asked for exactly those tests."""
    return any("::" in arg or arg.split("::")[0].endswith(".py") for arg in config.args)


def pytest_collection_modifyitems(config, items):
    """Tests that launch the CLI through the run_train fixture are `subprocess` tests, marked or not.

    `pytest` alone leaves out the slow, slurm and system tests; `-m <expr>` or a test file or node id on the
    command line is the user's own choice and runs as given."""
    for item in items:
        if "run_train" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("subprocess"):
            item.add_marker(pytest.mark.subprocess)
    if config.option.markexpr or named_tests(config):
        return
    off = [item for item in items if any(item.get_closest_marker(m) for m in OFF_BY_DEFAULT)]
    if off:
        config.hook.pytest_deselected(items=off)
        items[:] = [item for item in items if item not in off]


# Overrides for a tiny, quiet CPU run: width 0.125, one epoch, no bars, no figures, no config tree.
TINY = ["model.width=0.125", "trainer.accelerator=cpu", "trainer.max_epochs=1", "data.batch_size=16",
        "data.eval_batch_size=16", "callbacks.progress_bar=none", "trainer.enable_progress_bar=false",
        "callbacks.guided_backprop.every_n_epochs=0", "print_config=false"]


def run_cli(*args: str, cwd: Path, script: Path = TRAIN_PY, env: dict | None = None,
            timeout: float = 300) -> tuple[int, str, str]:
    """Run a script of src/ with the venv's python; returns (returncode, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", **(env or {})}
    proc = subprocess.run([PYTHON, str(script), *map(str, args)], cwd=str(cwd), env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def run_entry(tmp_path, monkeypatch, capsys):
    """run_entry(*args, script=TRAIN_PY, cwd=tmp_path) -> (exit status, stdout, stderr) of src/<script> run
    in this process, as `python src/<script> args` runs it (argv, cwd, __main__), ~0.1 s instead of a process
    start. For what fails before training (bad input): a real process is still needed for what happens after."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    def run(*args: str, script: Path = TRAIN_PY, cwd: Path | None = None):
        monkeypatch.chdir(cwd or tmp_path)
        monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the entry points set it; restored after the test
        capsys.readouterr()
        code = 0
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def run_train(tmp_path):
    """run_train(*overrides, cwd=tmp_path) -> (returncode, stdout, stderr) of `python src/train.py ...`."""

    def run(*args: str, cwd: Path | None = None, **kwargs):
        return run_cli(*args, cwd=cwd or tmp_path, **kwargs)

    return run


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides, config_name="train") -> the DictConfig Hydra would compose (in-process)."""
    from hydra import compose, initialize_config_dir

    def make(*overrides: str, config_name: str = "train"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))

    return make


def write_identity(run: Path, config: dict) -> Path:
    """identity.json as a run records its settings (nested config -> dotted keys): what the report reads."""
    import json

    from allconv.run_record import flat

    run.mkdir(parents=True, exist_ok=True)
    (run / "identity.json").write_text(json.dumps({"settings": flat(config), "data": "x"}))
    return run


def invoke(*args: str, cwd: Path, script: Path = TRAIN_PY) -> tuple[int, str]:
    """(exit status, stderr) of `python src/<script> args` run in this process, in cwd (faster than run_cli)."""
    import contextlib
    import io
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    before_cwd, before_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = [str(script), *map(str, args)]
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        os.chdir(before_cwd)
        sys.argv = before_argv
    return code, err.getvalue()


def hashes(folder: Path) -> dict[str, str | None]:
    """Every file's sha256 and every folder (None) under folder, by relative path; links are not followed."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def only_line(text: str) -> str:
    """The one line of text (stderr under the one-line error contract); fails on none or several."""
    lines = text.splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}:\n{text[-3000:]}"
    return lines[0]

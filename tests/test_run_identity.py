"""A run's identity is what it trained on: identity.json records resolved settings and the fingerprints of its
inputs, a continuation is held against the record and the checkpoint's own copy, sweeps that overlap are kept
apart, and a finished run is never written again. Each case runs the real entry point in this process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from allconv import precision, preprocessing, run_record
from allconv.report import runs
from allconv.run_folder import RunFolder
from conftest import hashes, invoke, only_line, write_npz

RUN = ["data=npz", "data.path=data.npz", "model.width=0.125", "trainer.max_epochs=1", "data.batch_size=16",
       "data.eval_batch_size=16", "logger=csv", "callbacks.progress_bar=none", "trainer.enable_progress_bar=false",
       "print_config=false", "callbacks.guided_backprop.every_n_epochs=0"]
# Whole runs and their continuations, each a few seconds of training: make test-system.
pytestmark = pytest.mark.system
ENV_RUN = [*RUN, "data.preprocess=${oc.env:ALLCONV_TEST_PRE}", "data.cache_dir=cache"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """root (the working directory: data.npz, the ZCA cache) and a finished GCN + ZCA run in root/run, started with
    data.preprocess=${oc.env:ALLCONV_TEST_PRE} and ALLCONV_TEST_PRE=gcn_zca."""
    root = tmp_path_factory.mktemp("identity")
    write_npz(root / "data.npz", n_train=64, n_test=16)
    os.environ["ALLCONV_TEST_PRE"] = "gcn_zca"
    try:
        code, err = invoke(*ENV_RUN, f"hydra.run.dir={root / 'run'}", cwd=root)
    finally:
        del os.environ["ALLCONV_TEST_PRE"]
    assert code == 0, err[-3000:]
    return root


@pytest.fixture
def env(monkeypatch):
    def set_to(value: str) -> None:
        monkeypatch.setenv("ALLCONV_TEST_PRE", value)
    return set_to


def interrupted_copy(finished: Path, dest: Path) -> Path:
    run = Path(shutil.copytree(finished, dest, symlinks=True))
    (run / "metrics.json").unlink()
    return run


def identity(run: Path) -> dict:
    return json.loads((run / "identity.json").read_text())


def edit_identity(run: Path, **changes) -> None:
    (run / "identity.json").write_text(json.dumps({**identity(run), **changes}))


# -- the record holds resolved settings -------------------------------------------------------------------
def test_the_record_holds_what_an_environment_variable_resolved_to(made):
    recorded = identity(made / "run")
    assert recorded["settings"]["data.preprocess"] == "gcn_zca"
    assert "data.preprocess='gcn_zca'" in recorded["overrides"]
    assert not any("${" in o for o in recorded["overrides"])
    assert recorded["precision"] == precision.resolve("auto")[0]  # what auto means on this machine
    assert len(recorded["fit"]) == 20 and recorded["inputs"]
    assert not (made / "run" / ".hydra").exists()  # the record is the project's own


def test_the_long_form_in_another_environment_is_refused(made, tmp_path, env):
    run = interrupted_copy(made / "run", tmp_path / "run")
    before = hashes(run)
    env("standardize")
    code, err = invoke(*ENV_RUN, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run}", cwd=made)
    assert code == 2
    assert "holds a run with other settings (data.preprocess gcn_zca vs standardize)" in only_line(err)
    assert hashes(run) == before


def test_resume_replays_the_value_the_environment_had(made, tmp_path, env):
    run = interrupted_copy(made / "run", tmp_path / "run")
    env("standardize")
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert json.loads((run / "metrics.json").read_text())["preprocess"] == "gcn_zca"


def test_a_sweep_with_an_environment_value_relaunches_in_the_same_environment(made, tmp_path, env):
    env("standardize")
    sweep = tmp_path / "sweep"
    args = ["-m", *ENV_RUN, "optim.lr=0.05", f"hydra.sweep.dir={sweep}"]
    code, err = invoke(*args, cwd=made)
    assert code == 0, err[-3000:]
    code, err = invoke(*args, cwd=made)
    assert code == 0, err[-3000:]
    assert err.count(": already finished (test error") == 1


def test_an_unresolvable_or_mistyped_setting_is_one_line(made, tmp_path, monkeypatch):
    monkeypatch.delenv("ALLCONV_TEST_SEED", raising=False)
    code, err = invoke(*RUN, "seed=${oc.env:ALLCONV_TEST_SEED}", f"hydra.run.dir={tmp_path / 'a'}", cwd=made)
    assert code == 2 and "ALLCONV_TEST_SEED" in only_line(err)
    monkeypatch.setenv("ALLCONV_TEST_SEED", "3")  # a string: the schema says what it takes
    code, err = invoke(*RUN, "seed=${oc.env:ALLCONV_TEST_SEED}", f"hydra.run.dir={tmp_path / 'b'}", cwd=made)
    assert code == 2 and only_line(err).startswith("error: seed=") and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- the fingerprint covers the whitening actually used ---------------------------------------------------
def test_another_valid_whitening_fit_for_the_same_images_is_refused(made, tmp_path):
    run = interrupted_copy(made / "run", tmp_path / "run")
    (cached,) = (made / "cache").glob("zca-*.pt")
    other = tmp_path / "other-cache"
    other.mkdir()
    state = torch.load(cached, weights_only=True)
    state["P"] = state["P"] * 0.9  # still symmetric, positive definite, in range: the cache's checks pass it
    torch.save(state, other / cached.name)
    code, err = invoke(f"resume={run}", f"data.cache_dir={other}", cwd=made)
    assert code == 2  # refused when the job has loaded the fit: a setting of the command, not a fault of the run
    assert only_line(err).startswith(f"error: {run} holds a run whitened by another preprocessing fit")
    assert not (run / "metrics.json").exists() and RunFolder(run).state() == "interrupted"
    code, err = invoke(f"resume={run}", f"data.cache_dir={tmp_path / 'empty'}", cwd=made)  # fitted again: the same
    assert code == 0, err[-3000:]


def test_two_fits_of_one_training_set_agree_and_another_fit_does_not():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(256, 48)))
    a = preprocessing.ZCA(0.1).fit(x)
    b = preprocessing.ZCA(0.1).fit(x[torch.randperm(256)])  # another summation order: rounding differs
    c = preprocessing.ZCA(0.2).fit(x)
    assert run_record.same_fit(preprocessing.summary(a.mean, a.P), preprocessing.summary(b.mean, b.P))
    assert not run_record.same_fit(preprocessing.summary(a.mean, a.P), preprocessing.summary(c.mean, c.P))


# -- the record is held against the checkpoint --------------------------------------------------------------
def test_a_deleted_record_is_rebuilt_from_the_checkpoint_and_other_arrays_are_refused(made, tmp_path):
    run = interrupted_copy(made / "run", tmp_path / "run")
    (run / "identity.json").unlink()
    other = write_npz(tmp_path / "other.npz", n_train=64, n_test=16, seed=5)  # same shapes, other images
    before = hashes(run)
    code, err = invoke(f"resume={run}", f"data.path={other}", cwd=made)
    assert code == 2 and only_line(err).startswith(f"error: {run} holds a run on other data")
    assert hashes(run) == before
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert f"warning: {run / 'identity.json'} is missing; rebuilt from the run's checkpoint" in err
    assert identity(run)["data"] == identity(made / "run")["data"]


@pytest.mark.parametrize("damage", [{"data": None}, {"data": ""}, "null"])
def test_a_damaged_record_is_refused_and_rebuilt_once_deleted(made, tmp_path, damage):
    run = interrupted_copy(made / "run", tmp_path / "run")
    if damage == "null":
        (run / "identity.json").write_text("null")
    else:
        edit_identity(run, **damage)
    before = hashes(run)
    code, err = invoke(f"resume={run}", cwd=made)
    line = only_line(err)
    assert code == 2 and ("to rebuild it from the" in line or "not this project's record" in line), err
    assert hashes(run) == before
    (run / "identity.json").unlink()
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 0, err[-3000:]


def test_an_edited_learning_rate_in_the_record_is_refused(made, tmp_path):
    run = interrupted_copy(made / "run", tmp_path / "run")
    recorded = identity(run)
    edit_identity(run, settings={**recorded["settings"], "optim.lr": 0.1},
                  overrides=[*recorded["overrides"], "optim.lr=0.1"])
    before = hashes(run)
    code, err = invoke(f"resume={run}", "optim.lr=0.1", cwd=made)
    assert code == 2
    assert "identity.json disagrees with the run's checkpoint (optim.lr" in only_line(err)
    assert hashes(run) == before


def test_the_checkpoint_confirms_the_settings_of_a_folder_without_a_record(made, tmp_path):
    """A folder from before identity.json: its checkpoint's own saved settings decide what may continue it."""
    run = interrupted_copy(made / "run", tmp_path / "run")
    (run / "identity.json").unlink()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["callbacks"]["RunIdentity"]
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    code, err = invoke(*RUN, "data.preprocess=gcn_zca", "data.cache_dir=cache", "optim.lr=0.1",
                       f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run}", cwd=made)
    assert code == 2 and "optim.lr 0.05 vs 0.1" in only_line(err)
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 2 and "started by an older allconv" in only_line(err)
    code, err = invoke(*RUN, "data.preprocess=gcn_zca", "data.cache_dir=cache",
                       f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run}", cwd=made)
    assert code == 0, err[-3000:]


# -- overlapping launches ----------------------------------------------------------------------------------
def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_launch_of_one_sweep_is_refused_while_the_first_runs(made, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    first = _hold_in_another_process(sweep)  # as a launch that is planning or training this sweep does
    try:
        code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", f"hydra.sweep.dir={sweep}", cwd=made)
    finally:
        first.kill()
        first.wait()
    assert code == 2
    assert only_line(err) == (f"error: hydra.sweep.dir={str(sweep)!r} is being launched by another process; wait "
                              f"for it to end (two launches of one sweep would train the same folders)")
    assert list(sweep.iterdir()) == []


def test_a_job_that_cannot_run_counts_as_failed(made, tmp_path):
    """Arrays whose headers are fine and whose data is not: the pre-flight passes, the job cannot load them."""
    data = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3:len(raw) // 3 + 64] = bytes(64)  # inside x_train's pixels: its CRC fails when it is read
    data.write_bytes(bytes(raw))
    sweep = tmp_path / "sweep"
    code, err = invoke("-m", *RUN, f"data.path={data}", "data.preprocess=standardize", f"hydra.sweep.dir={sweep}",
                       cwd=made)
    assert code == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: 1 of 1 jobs failed: job 0 (0_all_cnn_c_lr0.05_s0)")
    assert not RunFolder(sweep / "0_all_cnn_c_lr0.05_s0").is_run()  # nothing recorded as a run


def test_a_jobs_folder_must_be_a_real_folder_inside_its_sweep(made, tmp_path):
    from allconv import sweep_folder
    from allconv.errors import RunFolderError

    sweep, outside = tmp_path / "sweep", tmp_path / "outside"
    sweep.mkdir()
    outside.mkdir()
    (sweep / "job").symlink_to(outside)
    with pytest.raises(RunFolderError, match="is a symbolic link"):
        sweep_folder.check_job_folder(RunFolder(sweep / "job"), sweep)
    with pytest.raises(RunFolderError, match="is not inside the sweep folder"):
        sweep_folder.check_job_folder(RunFolder(outside), sweep)


# -- finished is untouched ---------------------------------------------------------------------------------------
def test_a_finished_sweep_relaunched_with_more_epochs_is_not_written_at_all(made, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *RUN, "data.preprocess=standardize", "optim.lr=0.05,0.1", f"hydra.sweep.dir={sweep}"]
    code, err = invoke(*args, cwd=made)
    assert code == 0, err[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    before = {job: (hashes(job), {p: p.stat().st_mtime_ns for p in job.rglob("*")}) for job in jobs}
    time.sleep(0.01)
    code, err = invoke(*args, "trainer.max_epochs=2", cwd=made)
    assert code == 0, err[-3000:]
    assert err.count(": already finished (test error") == 2
    assert {job: (hashes(job), {p: p.stat().st_mtime_ns for p in job.rglob("*")}) for job in jobs} == before
    assert {r.metrics["epochs"] for r in runs.find_runs([sweep])} == {1}
    assert all(runs.run_settings(r)["epochs"] == 1 for r in runs.find_runs([sweep]))


# -- what is not a run ------------------------------------------------------------------------------------------
def test_a_folder_with_only_what_hydra_makes_is_not_a_run(made, tmp_path):
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)  # a kill right after Hydra made the folder (older versions)
    assert RunFolder(folder).state() == "new"
    code, err = invoke(*RUN, "data.preprocess=standardize", f"hydra.run.dir={folder}", cwd=made)
    assert code == 0, err[-3000:]
    sweep = tmp_path / "sweep"
    (sweep / "0_all_cnn_c_lr0.05_s0" / ".hydra").mkdir(parents=True)
    code, err = invoke("-m", *RUN, "data.preprocess=standardize", f"hydra.sweep.dir={sweep}", cwd=made)
    assert code == 0, err[-3000:]


def test_a_sweep_into_a_run_and_a_run_into_a_sweep_are_refused(made, tmp_path):
    run = Path(shutil.copytree(made / "run", tmp_path / "run"))
    before = hashes(run)
    code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", f"hydra.sweep.dir={run}", cwd=made)
    assert code == 2 and only_line(err).startswith(f"error: hydra.sweep.dir={str(run)!r} holds a run")
    assert hashes(run) == before
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    code, err = invoke(*RUN, f"hydra.run.dir={sweep}", cwd=made)
    assert code == 2 and only_line(err).startswith(f"error: hydra.run.dir={str(sweep)!r} is a sweep folder")


def test_a_multirun_record_that_is_a_folder_is_one_line(made, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "multirun.yaml").mkdir(parents=True)
    code, err = invoke("-m", *RUN, "optim.lr=0.05", f"hydra.sweep.dir={sweep}", cwd=made)
    assert code == 2 and only_line(err) == f"error: {sweep / 'multirun.yaml'} is not a plain file; a sweep writes " \
                                           f"it: move it away"


def test_a_lock_the_filesystem_refuses_is_one_line(made, tmp_path, monkeypatch):
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(fcntl, "flock", refuse)
    folder = tmp_path / "run"
    code, err = invoke(*RUN, "data.preprocess=standardize", f"hydra.run.dir={folder}", cwd=made)
    assert code == 1 and only_line(err).startswith("error: cannot lock ") and "(EINVAL)" in only_line(err)


def test_a_run_whose_start_met_a_full_disk_is_started_again_by_its_own_command(made, tmp_path, monkeypatch):
    from allconv import errors, run_folder

    folder = tmp_path / "run"
    real = run_record.write_json

    def full(path, obj):
        raise errors.WriteError(f"cannot write {path}: No space left on device (ENOSPC)")

    monkeypatch.setattr(run_record, "write_json", full)
    args = [*RUN, "data.preprocess=standardize", f"hydra.run.dir={folder}"]
    code, err = invoke(*args, cwd=made)
    assert code == 1 and "No space left on device" in only_line(err)
    assert not RunFolder(folder).is_run()
    monkeypatch.setattr(run_record, "write_json", real)
    assert run_folder.rr.write_json is real
    code, err = invoke(*args, cwd=made)
    assert code == 0, err[-3000:]


def test_a_folder_name_is_never_interpolated(made, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLCONV_TEST_SECRET", "s3cr3t")
    run = interrupted_copy(made / "run", tmp_path / "run${oc.env:ALLCONV_TEST_SECRET}")
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert "s3cr3t" not in err and (run / "metrics.json").is_file()
    assert not (tmp_path / "runs3cr3t").exists()


def test_the_whitening_cache_writes_no_file_through_a_link(tmp_path):
    from allconv.errors import DataError

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 12))).float()
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (cache / "zca-k.lock").symlink_to(outside / "created")
    with pytest.raises(DataError, match="zca-k.lock is a symbolic link"):
        preprocessing.fit_zca_cached(x, "k", cache)
    assert list(outside.iterdir()) == []
    (cache / "zca-k.lock").unlink()
    victim = outside / "victim.pt"
    victim.write_bytes(b"precious")
    (cache / "zca-k.pt").symlink_to(victim)
    preprocessing.fit_zca_cached(x, "k", cache)
    assert victim.read_bytes() == b"precious" and not (cache / "zca-k.pt").is_symlink()


def test_a_run_continued_after_its_last_epoch_still_draws_its_pictures(made, tmp_path):
    """A full disk at the run's very end (its grid and filters not written, metrics.json says failed): continued,
    it trains nothing more, and its pictures are drawn from the checkpoint's network."""
    run = tmp_path / "run"
    args = [*RUN, "data.preprocess=standardize", "callbacks.guided_backprop.every_n_epochs=10"]
    code, err = invoke(*args, f"hydra.run.dir={run}", cwd=made)
    assert code == 0, err[-3000:]
    shutil.rmtree(run / "guided_backprop")
    shutil.rmtree(run / "filters")
    (run / "metrics.json").write_text(json.dumps({"status": "failed", "error": "cannot write …: No space left"}))
    assert RunFolder(run).state() == "failed"
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert [p.name for p in (run / "guided_backprop").iterdir()] == ["epoch_001.png"]
    assert any((run / "filters").iterdir()) and RunFolder(run).state() == "finished"


@pytest.mark.parametrize("started_fast, now_fast", [(False, True), (True, False)])
def test_a_run_keeps_the_precision_it_started_in(made, tmp_path, monkeypatch, started_fast, now_fast):
    """trainer.precision=auto on a continuation keeps the recorded precision, whatever auto means on this machine."""
    def machine(fast: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16", lambda: precision.CpuBf16(fast, "the test's machine"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = "bf16-mixed" if started_fast else "32-true"
    run = tmp_path / "run"
    machine(started_fast)
    code, err = invoke(*RUN, "data.preprocess=standardize", f"hydra.run.dir={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert identity(run)["precision"] == started
    (run / "metrics.json").unlink()
    machine(now_fast)
    code, err = invoke(f"resume={run}", "trainer.max_epochs=2", cwd=made)
    assert code == 0, err[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == started and metrics["epochs"] == 2
    assert metrics["precision_reason"].startswith("kept from the run's record")


def test_a_run_that_set_a_key_this_version_removed_is_refused_naming_it(made, tmp_path):
    """A record (and its checkpoint's copy) holding a setting this version no longer has: one line naming the key
    and what to do, nothing written."""
    run = interrupted_copy(made / "run", tmp_path / "run")
    recorded = identity(run)
    settings = {**recorded["settings"], "model.old_knob": 3}
    edit_identity(run, settings=settings)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["callbacks"]["RunIdentity"]["settings"] = settings
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    before = hashes(run)
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 2
    assert ("model.old_knob: the run set it to 3 and this version of allconv has no such setting; continue the run "
            "with the version that made it") in only_line(err)
    assert hashes(run) == before

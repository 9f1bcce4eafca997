"""The run folder as users and attackers treat it: a log beside a run, a copied or moved run, a relaunch with one
more learning rate or another progress bar, links, FIFOs and alias bombs in the record. Each case runs the real
entry point in this process (allconv.run_folder is the one model every command asks)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from allconv import run_folder, run_record, sweep_folder
from allconv.errors import RunFolderError
from allconv.run_folder import RunFolder
from conftest import SRC, hashes, invoke, only_line, write_npz

EVAL_PY = SRC / "eval.py"
RUN = ["data=npz", "data.path=data.npz", "data.preprocess=standardize", "model.width=0.125", "trainer.max_epochs=1",
       "data.batch_size=16", "data.eval_batch_size=16", "logger=csv", "callbacks.progress_bar=none",
       "trainer.enable_progress_bar=false", "print_config=false", "callbacks.guided_backprop.every_n_epochs=0"]


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def interrupted_copy(finished: Path, dest: Path) -> Path:
    """A copy of a finished run as a kill after its first epoch leaves it: last.ckpt, no metrics.json."""
    run = Path(shutil.copytree(finished, dest, symlinks=True))
    (run / "metrics.json").unlink()
    return run


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """root (the working directory, holding data.npz) and a finished one-epoch run in root/run."""
    root = tmp_path_factory.mktemp("model")
    write_npz(root / "data.npz", n_train=64, n_test=16)
    code, err = invoke(*RUN, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert code == 0, err[-3000:]
    return root


# -- ordinary use ------------------------------------------------------------------------------------------
def test_a_folder_holding_only_the_users_log_takes_a_new_run(made, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.log").write_text("my log\n")
    (folder / "notes.md").write_text("why I ran this\n")
    assert RunFolder(folder).state() == "new"
    code, err = invoke(*RUN, f"data.path={made / 'data.npz'}", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert (folder / "train.log").read_text() == "my log\n" and (folder / "notes.md").read_text() == "why I ran this\n"
    assert json.loads((folder / "metrics.json").read_text())["status"] == "finished"


def test_a_copied_run_resumed_elsewhere_to_more_epochs_ends_as_its_uninterrupted_twin(made, tmp_path):
    """resume=<copy> trainer.max_epochs=2 from another working directory whose data.npz is other data: the run
    reads its own file (relative to where it started), writes its own last.ckpt (no last-v1.ckpt) and ends with
    the weights of a two-epoch run trained without a stop."""
    copy = interrupted_copy(made / "run", tmp_path / "moved" / "run")
    elsewhere = tmp_path / "elsewhere"
    write_npz(elsewhere / "data.npz", n_train=64, n_test=16, seed=7)
    code, err = invoke(f"resume={copy}", "trainer.max_epochs=2", cwd=elsewhere)
    assert code == 0, err[-3000:]
    twin = tmp_path / "twin"
    code, err = invoke(*RUN, "trainer.max_epochs=2", f"hydra.run.dir={twin}", cwd=made)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["last.ckpt"]
    assert json.loads((copy / "metrics.json").read_text())["epochs"] == 2
    a, b = weights(copy), weights(twin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, difference", [
    (["optim.lr=0.1"], "optim.lr 0.05 vs 0.1"),
    (["trainer.max_epochs=1", "+trainer.min_epochs=0"], "trainer.min_epochs unset vs 0"),
])
def test_the_long_form_keeps_the_runs_settings(made, tmp_path, change, difference):
    """ckpt_path=<dir>/checkpoints/last.ckpt hydra.run.dir=<dir> is checked by the same rule as resume=."""
    run = interrupted_copy(made / "run", tmp_path / "run")
    before = hashes(run)
    code, err = invoke(*RUN, *change, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run}",
                       cwd=made)
    assert code == 2
    assert f"holds a run with other settings ({difference}); a continuation keeps them" in only_line(err)
    assert hashes(run) == before


def test_a_run_is_continued_only_on_its_own_data(made, tmp_path):
    run = interrupted_copy(made / "run", tmp_path / "run")
    other = write_npz(tmp_path / "other.npz", n_train=64, n_test=16, seed=3)
    before = hashes(run)
    code, err = invoke(f"resume={run}", f"data.path={other}", cwd=made)
    assert code == 2
    assert only_line(err).startswith(f"error: {run} holds a run on other data (its arrays' fingerprint ")
    assert hashes(run) == before
    moved = shutil.copy(made / "data.npz", tmp_path / "moved.npz")  # the same arrays elsewhere: fine
    code, err = invoke(f"resume={run}", f"data.path={moved}", cwd=tmp_path)
    assert code == 0, err[-3000:]


def test_a_run_killed_before_its_first_checkpoint_starts_again_by_its_own_command(made, tmp_path):
    run = Path(shutil.copytree(made / "run", tmp_path / "run"))
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.json").write_text(json.dumps({"status": "interrupted", "error": "killed"}))
    assert RunFolder(run).state() == "started"
    before = hashes(run)
    code, err = invoke(*RUN, "optim.lr=0.1", f"hydra.run.dir={run}", cwd=made)  # another command: refused
    assert code == 2 and "holds a run with other settings (optim.lr 0.05 vs 0.1)" in only_line(err)
    assert hashes(run) == before
    code, err = invoke(*RUN, f"hydra.run.dir={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert RunFolder(run).state() == "finished"


def test_eval_leaves_a_failed_runs_record_as_it_was(made, tmp_path):
    failed = Path(shutil.copytree(made / "run", tmp_path / "failed"))
    shutil.rmtree(failed / "checkpoints")
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "non-finite loss"}))
    before = hashes(failed)
    code, err = invoke(f"ckpt_path={made / 'run' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={failed}",
                       cwd=made, script=EVAL_PY)
    assert code == 2 and only_line(err).startswith(f"error: hydra.run.dir='{failed}' holds a training run")
    assert hashes(failed) == before


# -- sweeps ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(made):
    """optim.lr=0.05,0.1 run to the end: two finished jobs."""
    folder = made / "sweep"
    code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", f"hydra.sweep.dir={folder}", cwd=made)
    assert code == 0, err[-3000:]
    return folder


def sweep_copy(sweep: Path, dest: Path) -> Path:
    return Path(shutil.copytree(sweep, dest, symlinks=True))


def ckpt_times(sweep: Path) -> dict[str, int]:
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/checkpoints/last.ckpt")}


def test_a_finished_sweep_relaunched_with_another_progress_bar_retrains_nothing(made, sweep, tmp_path):
    folder = sweep_copy(sweep, tmp_path / "sweep")
    before = ckpt_times(folder)
    code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", "callbacks.progress_bar=tqdm", "print_config=true",
                       f"hydra.sweep.dir={folder}", cwd=made)
    assert code == 0, err[-3000:]
    assert err.count(": already finished (test error") == 2
    assert ckpt_times(folder) == before


def test_a_relaunch_with_one_more_learning_rate_trains_only_the_new_run(made, sweep, tmp_path):
    """lr 0.2 in front renumbers every job: the finished runs are found by identity, not by number."""
    folder = sweep_copy(sweep, tmp_path / "sweep")
    before = ckpt_times(folder)
    code, err = invoke("-m", *RUN, "optim.lr=0.2,0.05,0.1", f"hydra.sweep.dir={folder}", cwd=made)
    assert code == 0, err[-3000:]
    after = ckpt_times(folder)
    assert sorted(after) == sorted([*before, "0_all_cnn_c_lr0.2_s0"])
    assert all(after[name] == before[name] for name in before)  # the finished runs: not trained again
    assert err.count(": already finished (test error") == 2
    assert json.loads((folder / "jobs.json").read_text())["folders"] == {
        "0": "0_all_cnn_c_lr0.2_s0", "1": "0_all_cnn_c_lr0.05_s0", "2": "1_all_cnn_c_lr0.1_s0"}
    from allconv.report import runs

    assert len(runs.find_runs([folder])) == 3


def test_jobs_that_would_share_a_folder_are_refused_before_any_starts(made, tmp_path):
    code, err = invoke("-m", *RUN, "seed=0,1", "hydra.sweep.subdir=lr${optim.lr}",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=made)
    assert code == 2
    assert only_line(err) == (f"error: jobs 0 and 1 would share the folder '{tmp_path / 'sweep' / 'lr0.05'}'; name "
                              f"what differs between them in hydra.sweep.subdir (it holds one run)")
    assert not (tmp_path / "sweep").exists()


def as_made_before_final_weights(job: Path) -> None:
    """A run folder as the project wrote it before model.final_weights existed: identity.json of format 1
    (settings as written), a checkpoint that carries no copy of it and saves no final_weights."""
    identity = json.loads((job / "identity.json").read_text())
    settings = {k: v for k, v in identity["settings"].items() if k != "model.final_weights"}
    settings["data.drop_last"] = "${model.compile}"
    (job / "identity.json").write_text(json.dumps({"settings": settings, "data": identity["data"],
                                                   "cwd": identity["cwd"]}))
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["callbacks"]["RunIdentity"]
    del ckpt["hyper_parameters"]["config"]["model"]["final_weights"]
    torch.save(ckpt, job / "checkpoints" / "last.ckpt")


def test_a_sweep_made_before_a_key_existed_relaunches_with_the_value_the_message_names(made, sweep, tmp_path):
    folder = sweep_copy(sweep, tmp_path / "sweep")
    for job in folder.glob("*_s0"):
        as_made_before_final_weights(job)
    code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", f"hydra.sweep.dir={folder}", cwd=made)
    assert code == 2
    line = only_line(err)
    assert ("holds another run (model.final_weights: the folder predates it and ran as init, pass "
            "model.final_weights=init)") in line, line
    code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", "model.final_weights=init", f"hydra.sweep.dir={folder}",
                       cwd=made)
    assert code == 0, err[-3000:]
    assert err.count(": already finished (test error") == 2


# -- crafted folders: links, FIFOs, alias bombs ----------------------------------------------------------------
@pytest.mark.parametrize("linked", ["identity.json", "checkpoints", "csv", "metrics.json"])
def test_a_link_in_a_run_folder_is_refused_and_nothing_is_written_through_it(made, tmp_path, linked):
    run = interrupted_copy(made / "run", tmp_path / "run")
    outside = tmp_path / "outside"
    target = run / linked
    if target.exists():
        shutil.move(target, outside)
    else:
        outside.write_text("{}")
    target.symlink_to(outside)
    before = hashes(tmp_path)
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 2
    assert only_line(err).startswith(f"error: {target} is a symbolic link (to {outside}); a run writes only inside")
    assert hashes(tmp_path) == before


@pytest.mark.timeout(60)
def test_a_fifo_in_the_record_is_refused_without_hanging(made, tmp_path):
    run = interrupted_copy(made / "run", tmp_path / "run")
    (run / "identity.json").unlink()
    os.mkfifo(run / "identity.json")
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 2
    assert only_line(err).startswith(f"error: {run / 'identity.json'} is a FIFO, not a plain file")
    os.mkfifo(run / "metrics.json")
    assert RunFolder(run).state() == "interrupted"  # a FIFO is no result, and reading it does not block


def test_records_nested_thousands_deep_are_refused(tmp_path):
    (tmp_path / "metrics.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(RunFolderError, match="nested"):
        run_record.read_json(tmp_path / "metrics.json")
    (tmp_path / "identity.json").write_text("{\"settings\": " + '{"a": ' * 100 + "1" + "}" * 101)
    with pytest.raises(RunFolderError, match="nested more than 64 levels"):
        RunFolder(tmp_path).read_identity()
    assert RunFolder(tmp_path).finished() is None


def test_a_poisoned_jobs_file_cannot_send_a_job_outside_its_sweep(tmp_path):
    for name in ("../outside", "/etc", "", "a/b"):
        (tmp_path / "jobs.json").write_text(json.dumps({"folders": {"0": name}}))
        with pytest.raises(RunFolderError, match="names no folder for job 0"):
            sweep_folder.job_folder(str(tmp_path), 0)


# -- Hydra's writes and the lock --------------------------------------------------------------------------------
def test_hydra_writes_nothing_into_a_run_and_a_link_there_is_left_alone(made, tmp_path):
    """The record is the project's own: no .hydra/ in a run, so a link at that name leads nowhere."""
    assert not (made / "run" / ".hydra").exists()
    run = interrupted_copy(made / "run", tmp_path / "run")
    victim = tmp_path / "victim"
    victim.mkdir()
    (run / ".hydra").symlink_to(victim)
    code, err = invoke(f"resume={run}", cwd=made)
    assert code == 0, err[-3000:]
    assert list(victim.iterdir()) == [] and RunFolder(run).state() == "finished"


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys, code):
    import fcntl

    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    RunFolder(tmp_path).hold()
    try:
        line = only_line(capsys.readouterr().err)
        assert line.startswith(f"warning: cannot lock {tmp_path.resolve()}: ")
        assert line.endswith("nothing now stops a second process from training this run at the same time")
    finally:
        RunFolder(tmp_path).release()


def test_the_report_counts_a_copied_run_once(made, tmp_path):
    from allconv.report import runs

    for name in ("run", "copy of run"):
        shutil.copytree(made / "run", tmp_path / name)
    found = runs.find_runs([tmp_path])
    assert [r.path.name for r in found] == ["copy of run"] and found[0].status == "finished"


@pytest.mark.parametrize("name, make, kind", [
    ("metrics.json", lambda p: p.mkdir(), "a folder, not a plain file"),
    ("checkpoints", lambda p: p.write_text("x"), "a plain file, not a folder"),
    ("checkpoints/last.ckpt", lambda p: p.mkdir(parents=True), "a folder, not a plain file"),
])
def test_a_record_path_of_the_wrong_kind_is_refused_before_training(made, tmp_path, name, make, kind):
    """Else the run trains to its end and only then fails to write metrics.json or its checkpoint."""
    run = Path(shutil.copytree(made / "run", tmp_path / "run"))
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "checkpoints")
    make(run / name)
    code, err = invoke(*RUN, f"hydra.run.dir={run}", cwd=made)
    assert code == 2
    assert only_line(err).startswith(f"error: {run / name} is {kind}; this is not a run folder of this project")


def test_a_checkpoint_of_another_network_is_refused_before_training(made, tmp_path):
    code, err = invoke(*RUN, "model.width=0.25", f"ckpt_path={made / 'run' / 'checkpoints' / 'last.ckpt'}",
                       f"hydra.run.dir={tmp_path / 'new'}", cwd=made)
    assert code == 2
    assert "holds another network than this command builds (net." in only_line(err)
    assert not (tmp_path / "new").exists()


def test_a_sweep_job_folder_that_is_a_link_is_refused(made, sweep, tmp_path):
    folder = sweep_copy(sweep, tmp_path / "sweep")
    job = folder / "0_all_cnn_c_lr0.05_s0"
    shutil.move(job, tmp_path / "outside")
    job.symlink_to(tmp_path / "outside")
    code, err = invoke("-m", *RUN, "optim.lr=0.05,0.1", f"hydra.sweep.dir={folder}", cwd=made)
    assert code == 2 and only_line(err).startswith(f"error: {job} is a symbolic link")


def test_a_job_never_takes_another_runs_folder(made, sweep, compose_cfg):
    """What a job checks itself (a requeued job, or a jobs.json edited between the launch and the job)."""
    cfg = compose_cfg(*RUN, "optim.lr=0.05")
    run_folder.check_job(RunFolder(sweep / "0_all_cnn_c_lr0.05_s0"), cfg)
    with pytest.raises(RunFolderError, match=r"holds another run \(optim.lr 0.1 vs 0.05\); this job does not"):
        run_folder.check_job(RunFolder(sweep / "1_all_cnn_c_lr0.1_s0"), cfg)


@pytest.mark.parametrize("out_dir, message", [
    ("run/checkpoints", "is inside the record of the run"),
    ("run/checkpoints/figures", "is inside the record of the run"),
    ("run/visualize/x", "is a symbolic link"),
])
def test_visualize_never_writes_a_runs_record_or_through_a_link(made, tmp_path, out_dir, message):
    run = Path(shutil.copytree(made / "run", tmp_path / "run"))
    (tmp_path / "elsewhere").mkdir()
    (run / "visualize").symlink_to(tmp_path / "elsewhere")
    before = hashes(tmp_path)
    code, err = invoke(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "viz.figure=filters",
                       f"out_dir={tmp_path / out_dir}", cwd=made, script=SRC / "visualize.py")
    assert code == 2 and message in only_line(err), err
    assert hashes(tmp_path) == before


def test_the_report_leaves_debug_runs_out_unless_given_them(made, tmp_path):
    from allconv.report import runs

    shutil.copytree(made / "run", tmp_path / "multirun" / "sweep" / "0_run")
    debug = Path(shutil.copytree(made / "run", tmp_path / "multirun" / "debug" / "sweep" / "0_run"))
    (debug / "identity.json").unlink()  # another run than the first, as far as the report can tell
    assert [r.path for r in runs.find_runs([tmp_path / "multirun"])] == [tmp_path / "multirun" / "sweep" / "0_run"]
    assert [r.path for r in runs.find_runs([tmp_path / "multirun" / "debug"])] == [debug]

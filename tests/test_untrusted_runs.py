"""Run folders and checkpoints from elsewhere are data, never commands: resume= replays only the run's own
settings and refuses a change to them, eval and visualize take from a checkpoint only the network and its
test set, and a non-finite checkpoint is refused. Each refusal is one line, exit status 2, every file as it was.

Every crafted file starts from a real tiny run (made once per module) and is edited here."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from allconv.resume import expand_argv
from allconv.run_folder import RunFolder
from conftest import SRC, TINY, hashes, only_line, run_cli, write_npz

EVAL_PY = SRC / "eval.py"
VISUALIZE_PY = SRC / "visualize.py"
REPLAYS = ("resume replays only the run's own settings (callbacks, data, debug, experiment, hparams_search, logger, "
           "model, optim, print_config, seed, tags, trainer), never hydra.*, _target_ or ${...}")
KEEPS = ("a continuation keeps them and may change only print_config, callbacks.progress_bar, "
         "callbacks.progress_bar_refresh, model.channels_last, trainer.enable_progress_bar, "
         "trainer.enable_model_summary, trainer.profiler, logger, tags, data.root, data.path, data.download, "
         "data.verify_md5, data.cache_dir (the data in another place, not other data) and trainer.max_epochs upward: "
         "start a new run to change the rest")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished tiny All-CNN-C run (GCN + ZCA, width 0.125, one epoch): (its folder, its metrics)."""
    root = tmp_path_factory.mktemp("made")
    data = write_npz(root / "data.npz", n_train=48, n_test=20)
    run = root / "run"
    rc, out, err = run_cli(*TINY, "data=npz", f"data.path={data}", "logger=none", f"hydra.run.dir={run}", cwd=root)
    assert rc == 0, err[-3000:]
    return run, json.loads((run / "metrics.json").read_text())


@pytest.fixture
def finished(made, tmp_path) -> Path:
    """A copy of the finished run, in this test's folder."""
    return Path(shutil.copytree(made[0], tmp_path / "finished")).resolve()


@pytest.fixture
def interrupted(made, tmp_path) -> Path:
    """A copy of the run as a killed one leaves it: last.ckpt, no metrics.json."""
    run = Path(shutil.copytree(made[0], tmp_path / "run")).resolve()
    (run / "metrics.json").unlink()
    return run


def add_overrides(run: Path, *entries: str) -> None:
    """Entries added to the overrides identity.json records (what resume= replays)."""
    identity = json.loads((run / "identity.json").read_text())
    identity["overrides"] += list(entries)
    (run / "identity.json").write_text(json.dumps(identity))


def craft(source: Path, dest: Path, edit) -> Path:
    """A copy of the checkpoint `source` at dest, its dict changed by edit(ckpt)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    edit(ckpt)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


# -- resume= replays the run's own settings only ------------------------------------------------------------
@pytest.mark.subprocess
def test_a_saved_hydra_callback_is_refused_and_builds_nothing(interrupted, tmp_path):
    """Hydra builds every hydra.callbacks entry: replayed, builtins.open(victim, "w") would empty the file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    add_overrides(interrupted, "+hydra.callbacks.x._target_=builtins.open", f"+hydra.callbacks.x.file={victim}",
                  "+hydra.callbacks.x.mode=w")
    before = hashes(interrupted)
    rc, out, err = run_cli(f"resume={interrupted}", cwd=tmp_path)
    assert rc == 2, err[-3000:]
    assert only_line(err) == (f"error: resume={interrupted}: identity.json override "
                              f"'+hydra.callbacks.x._target_=builtins.open' names a _target_ (an object to build); "
                              f"{REPLAYS}")
    assert victim.read_text() == "precious\n"
    assert hashes(interrupted) == before


@pytest.mark.parametrize("entry, why", [
    ("hydra/launcher=basic", "is not a setting of the run"),
    ("hydra.job_logging.root.level=DEBUG", "is not a setting of the run"),
    ("+callbacks.x._target_=builtins.print", "names a _target_ (an object to build)"),
    ("data.path=${oc.env:HOME}", "holds an interpolation"),
    ("+callbacks@hydra.callbacks=default", "places a config under another package (@)"),
    ("seed=0,1", "is a sweep"),
])
def test_saved_entries_resume_does_not_replay(run_entry, interrupted, entry, why):
    add_overrides(interrupted, entry)
    before = hashes(interrupted)
    code, out, err = run_entry(f"resume={interrupted}")
    assert code == 2
    assert only_line(err) == f"error: resume={interrupted}: identity.json override {entry!r} {why}; {REPLAYS}"
    assert hashes(interrupted) == before


def test_a_legit_run_replays_its_own_overrides(interrupted):
    argv = expand_argv(["train.py", f"resume={interrupted}", "print_config=true", "model.width=0.125"])
    saved = json.loads((interrupted / "identity.json").read_text())["overrides"]
    ckpt = ckpt_of(interrupted)
    assert argv == ["train.py", *[o for o in saved if not o.startswith(("model.width=", "print_config="))],
                    "print_config=true", "model.width=0.125", f"ckpt_path='{ckpt}'", f"hydra.run.dir='{interrupted}'",
                    "hydra.mode=RUN"]


# -- a resumed run keeps its settings -----------------------------------------------------------------------
@pytest.mark.subprocess
def test_a_changed_setting_on_resume_is_refused_and_the_run_still_resumes(interrupted, tmp_path):
    before = hashes(interrupted)
    rc, out, err = run_cli(f"resume={interrupted}", "model.width=0.5", cwd=tmp_path)
    assert rc == 2, err[-3000:]
    assert only_line(err) == (f"error: hydra.run.dir='{interrupted}' holds a run with other settings (model.width "
                              f"0.125 vs 0.5); {KEEPS}")
    assert hashes(interrupted) == before  # identity.json not rewritten: the plain resume below works
    rc, out, err = run_cli(f"resume={interrupted}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert json.loads((interrupted / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("override, difference", [
    ("seed=1", "seed 0 vs 1"), ("optim.lr=0.5", "optim.lr 0.05 vs 0.5"), ("model=all_cnn_a", "model.family c vs a"),
    ("data.batch_size=8", "data.batch_size 16 vs 8"), ("data.preprocess=standardize", "data.preprocess gcn_zca vs "
                                                                                      "standardize"),
    ("callbacks.checkpoint.every_n_epochs=2", "callbacks.checkpoint.every_n_epochs 1 vs 2"),
])
def test_settings_a_resume_cannot_change(run_entry, interrupted, override, difference):
    """The pre-flight's one rule (run_folder.differences), before anything is written."""
    before = hashes(interrupted)
    code, out, err = run_entry(f"resume={interrupted}", override)
    assert code == 2
    assert only_line(err) == (f"error: hydra.run.dir='{interrupted}' holds a run with other settings ({difference}); "
                              f"{KEEPS}")
    assert hashes(interrupted) == before


@pytest.mark.parametrize("override", ["print_config=true", "callbacks.progress_bar=rich", "logger=csv",
                                      "trainer.enable_progress_bar=true", "seed=0", "data=npz", "model=all_cnn_c",
                                      "optim.lr=0.05", "trainer.max_epochs=5"])
def test_what_a_resume_may_set(interrupted, override):
    assert override in expand_argv(["train.py", f"resume={interrupted}", override])


@pytest.mark.parametrize("kind", ["finished", "conflict", "hydra entry", "corrupt checkpoint", "nan checkpoint",
                                  "interpolated checkpoint", "overrides not a list"])
def test_a_failed_resume_leaves_the_folder_byte_identical(run_entry, interrupted, kind):
    extra = []
    if kind == "finished":
        (interrupted / "metrics.json").write_text('{"status": "ok", "test_error": 0.5}')
    elif kind == "conflict":
        extra = ["optim.lr=0.5"]
    elif kind == "hydra entry":
        add_overrides(interrupted, "hydra.run.dir=elsewhere", "hydra.sweep.dir=elsewhere")
    elif kind == "corrupt checkpoint":
        ckpt_of(interrupted).write_bytes(ckpt_of(interrupted).read_bytes()[:1000])
    elif kind == "nan checkpoint":
        craft(ckpt_of(interrupted), ckpt_of(interrupted), _poison(math.nan))
    elif kind == "interpolated checkpoint":
        craft(ckpt_of(interrupted), ckpt_of(interrupted),
              lambda c: c["hyper_parameters"]["config"]["data"].update(cache_dir="${oc.env:HOME}"))
    else:
        identity = json.loads((interrupted / "identity.json").read_text())
        (interrupted / "identity.json").write_text(json.dumps({**identity, "overrides": "seed: 1"}))
    before = hashes(interrupted)
    code, out, err = run_entry(f"resume={interrupted}", *extra)
    assert code == 2
    line = only_line(err)
    assert line.startswith((f"error: resume={interrupted}: ", f"error: hydra.run.dir='{interrupted}' ")), line
    assert hashes(interrupted) == before


@pytest.mark.subprocess
def test_two_resumes_of_one_run_cannot_both_train(interrupted, tmp_path):
    """This process holds the run (as a resume that is training it does); a second resume is refused."""
    before = hashes(interrupted)
    RunFolder(interrupted).hold()
    try:
        rc, out, err = run_cli(f"resume={interrupted}", cwd=tmp_path)
    finally:
        RunFolder(interrupted).release()
    assert rc == 2, err[-3000:]
    assert only_line(err) == (f"error: {interrupted} is being trained by another process; wait for it to end "
                              f"(two processes cannot train one run)")
    assert hashes(interrupted) == before


@pytest.mark.subprocess
def test_a_new_run_into_a_finished_runs_folder_is_refused(made, finished, tmp_path):
    data = made[0].parent / "data.npz"
    before = hashes(finished)
    rc, out, err = run_cli(*TINY, "data=npz", f"data.path={data}", "logger=none", f"hydra.run.dir={finished}",
                           cwd=tmp_path)
    assert rc == 2, err[-3000:]
    assert only_line(err) == (f"error: hydra.run.dir='{finished}' already holds a finished run (metrics.json); "
                              f"a run is never overwritten: choose another hydra.run.dir (or leave it unset)")
    assert hashes(finished) == before


def test_a_new_run_with_the_finished_runs_checkpoint_is_refused(run_entry, made, finished):
    before = hashes(finished)
    code, out, err = run_entry(*TINY, "data=npz", f"data.path={made[0].parent / 'data.npz'}", "logger=none",
                               f"hydra.run.dir={finished}", f"ckpt_path={ckpt_of(finished)}")
    assert code == 2
    assert only_line(err).startswith(f"error: hydra.run.dir='{finished}' already holds a finished run")
    assert hashes(finished) == before


def test_eval_into_a_training_runs_folder_is_refused(run_entry, finished):
    before = hashes(finished)
    code, out, err = run_entry(f"ckpt_path={ckpt_of(finished)}", f"hydra.run.dir={finished}", script=EVAL_PY)
    assert code == 2
    assert only_line(err) == (f"error: hydra.run.dir='{finished}' holds a training run; eval writes into a folder "
                              f"of its own: choose another hydra.run.dir (or leave it unset)")
    assert hashes(finished) == before


# -- a checkpoint's saved config is data ---------------------------------------------------------------------
def interpolated(path: Path) -> str:
    return (f"error: checkpoint '{path}': hyper_parameters.config.data.path is an interpolation (${{...}}); "
            f"a saved config holds plain values only, refused unresolved")


@pytest.mark.subprocess
def test_eval_never_resolves_an_interpolation_saved_in_a_checkpoint(made, tmp_path):
    secret = "the-value-of-a-variable"
    forged = craft(ckpt_of(made[0]), tmp_path / "forged.ckpt",
                   lambda c: c["hyper_parameters"]["config"]["data"].update(path="${oc.env:ALLCONV_TEST_SECRET}"))
    before = hashes(tmp_path)
    rc, out, err = run_cli(f"ckpt_path={forged}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path,
                           script=EVAL_PY, env={"ALLCONV_TEST_SECRET": secret})
    assert rc == 2, err[-3000:]
    assert only_line(err) == interpolated(forged) and secret not in err
    assert hashes(tmp_path) == before  # no eval folder


def test_visualize_never_resolves_an_interpolation_saved_in_a_checkpoint(run_entry, made, tmp_path):
    forged = craft(ckpt_of(made[0]), tmp_path / "forged.ckpt",
                   lambda c: c["hyper_parameters"]["config"]["data"].update(path="${oc.env:HOME}"))
    before = hashes(tmp_path)
    code, out, err = run_entry(f"ckpt_path={forged}", f"out_dir={tmp_path / 'viz'}", "viz.figure=filters",
                               script=VISUALIZE_PY)
    assert code == 2
    assert only_line(err) == interpolated(forged)
    assert hashes(tmp_path) == before


def _steer(what: str, tmp_path: Path):
    def edit(ckpt):
        cfg = ckpt["hyper_parameters"]["config"]
        if what == "cache_dir":  # where the ZCA fit (75 MB for CIFAR-10) would be written
            cfg["data"].update(cache_dir=str(tmp_path / "crafted-cache"), root=str(tmp_path / "crafted-root"))
        elif what == "devices":
            cfg["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
        else:
            cfg["trainer"]["no_such_trainer_key"] = 1
    return edit


@pytest.mark.subprocess
@pytest.mark.parametrize("what", ["cache_dir", "devices", "unknown trainer key"])
def test_eval_takes_only_the_network_and_its_test_set_from_a_checkpoint(made, tmp_path, what):
    run, metrics = made
    forged = craft(ckpt_of(run), tmp_path / "ckpt" / "forged.ckpt", _steer(what, tmp_path))
    rc, out, err = run_cli(f"ckpt_path={forged}", f"hydra.run.dir={tmp_path / 'eval'}",
                           "trainer.enable_progress_bar=false", cwd=tmp_path, script=EVAL_PY, timeout=240)
    assert rc == 0, err[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["test_error"] == pytest.approx(metrics["test_error"], abs=1e-6)
    assert [line for line in out.splitlines() if "test error" in line] == [
        f"all_cnn_c on npz: test error {result['test_error']:.4f}  ->  {tmp_path / 'eval' / 'eval.json'}"]  # one rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "eval"]  # no crafted cache or data folder


def test_visualize_takes_only_the_network_and_its_test_set_from_a_checkpoint(run_entry, made, tmp_path):
    forged = craft(ckpt_of(made[0]), tmp_path / "ckpt" / "forged.ckpt", _steer("cache_dir", tmp_path))
    code, out, err = run_entry(f"ckpt_path={forged}", f"out_dir={tmp_path / 'viz'}", "viz.figure=whitening",
                               "viz.num_images=2", "device=cpu", script=VISUALIZE_PY)
    assert code == 0, err[-3000:]
    assert (tmp_path / "viz" / "whitening.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "viz"]


# -- non-finite weights ----------------------------------------------------------------------------------------
def non_finite(path: Path, name: str) -> str:
    return (f"error: checkpoint '{path}': state_dict tensor '{name}' holds NaN or inf; the run diverged or the "
            f"file was altered, use an earlier checkpoint")


def _poison(value: float, index: int = 2):
    """The index-th tensor of the state_dict gets one `value`; a later one too, so the message names the first."""
    def edit(ckpt):
        names = [k for k, t in ckpt["state_dict"].items() if t.is_floating_point()]
        for name in (names[index], names[-1]):
            flat = ckpt["state_dict"][name].flatten()
            flat[0] = value
            ckpt["state_dict"][name] = flat.reshape(ckpt["state_dict"][name].shape)
    return edit


def _first_poisoned(path: Path, index: int = 2) -> str:
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return [k for k, t in sd.items() if t.is_floating_point()][index]


@pytest.mark.subprocess
@pytest.mark.parametrize("script", [EVAL_PY, VISUALIZE_PY], ids=["eval", "visualize"])
def test_a_checkpoint_with_non_finite_weights_is_refused(made, tmp_path, script):
    forged = craft(ckpt_of(made[0]), tmp_path / "forged.ckpt", _poison(math.nan if script == EVAL_PY else math.inf))
    before = hashes(tmp_path)
    rc, out, err = run_cli(f"ckpt_path={forged}", f"hydra.run.dir={tmp_path / 'eval'}"
                           if script == EVAL_PY else f"out_dir={tmp_path / 'viz'}", cwd=tmp_path, script=script)
    assert rc == 2, err[-3000:]
    assert only_line(err) == non_finite(forged, _first_poisoned(ckpt_of(made[0])))
    assert hashes(tmp_path) == before


def test_resume_refuses_non_finite_weights(run_entry, interrupted):
    name = _first_poisoned(ckpt_of(interrupted))
    craft(ckpt_of(interrupted), ckpt_of(interrupted), _poison(-math.inf))
    before = hashes(interrupted)
    code, out, err = run_entry(f"resume={interrupted}")
    assert code == 2
    assert only_line(err) == (f"error: resume={interrupted}: {non_finite(ckpt_of(interrupted), name)[7:]}; delete it "
                              f"and start the run again (or restore an earlier copy of last.ckpt)")
    assert hashes(interrupted) == before

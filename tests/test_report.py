"""src/report.py: lr chosen per model (on validation when there is one, else on test), mean ± std over
seeds, the paper's and the review's errors, failed/incomplete/missing runs listed, bad folders refused."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.text
import pytest

from allconv import report
from allconv.report import curves, pages, runs, table
from conftest import write_identity


def write_run(root: Path, model: str, lr: float, seed: int, test: float | None = None, val: float | None = None,
              status: str = "ok", **extra) -> Path:
    run = root / f"{model}_lr{lr}_s{seed}"
    run.mkdir(parents=True)
    family, variant = {"all_cnn_c": ("c", "allcnn"), "model_a": ("a", "base"), "model_c": ("c", "base")}[model]
    settings = {"model.family": family, "model.variant": variant, "optim.lr": lr, "seed": seed}
    settings |= {f"{section}.{key}": extra[key] for section, key in (("optim", "max_update_norm"), ("data", "augment"))
                 if key in extra}  # a run's identity records what its metrics.json repeats
    (run / "identity.json").write_text(json.dumps({"settings": settings, "data": "x"}))
    if status == "incomplete":
        return run
    m = {"status": status, "model": model, "lr": lr, "seed": seed}
    if status == "ok":
        names = {"all_cnn_c": "All-CNN-C", "model_a": "Model A", "model_c": "Model C"}
        m |= {"network": names[model], "test_error": test, "params": 1000, "wall_time_s": 90.0, "data": "npz",
              "width": 0.25, "epochs": 1} | extra
        if val is not None:
            m["val_error"] = val
    else:
        m["error"] = "non-finite loss at epoch 0, step 3"
    (run / "metrics.json").write_text(json.dumps(m))
    return run


def test_lr_selected_on_test_with_failed_incomplete_and_missing_runs(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, (a, b) in enumerate([(0.20, 0.30), (0.22, 0.34)]):
        write_run(sweep, "all_cnn_c", 0.1, seed, test=a)
        write_run(sweep, "all_cnn_c", 0.05, seed, test=b)
    write_run(sweep, "model_a", 0.1, 0, test=0.5)
    write_run(sweep, "model_a", 0.05, 0, test=0.4)
    write_run(sweep, "model_a", 0.1, 1, status="failed")
    write_run(sweep, "model_a", 0.05, 1, status="incomplete")  # killed: identity.json but no metrics.json
    bad = write_run(sweep, "model_a", 0.25, 0, test=0.1)
    (bad / "metrics.json").write_text('{"status": "ok", "test_er')  # torn file from a dead disk
    text, out = table.report([sweep])

    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    c = [c.strip() for c in rows["All-CNN-C"].split("|")]
    assert c[2].startswith("0.1") and c[3] == table.ON_TEST and c[4] == "0, 1"
    assert c[5] == "21.00 ± 1.41" and c[6] == "9.08" and c[7] == "11.17" and c[8] == "1,000" and c[9] == "1.5 min"
    a = [c.strip() for c in rows["Model A"].split("|")]
    assert a[2].startswith("0.05") and a[5] == "40.00"  # one seed: no std
    assert a[6] == "12.47" and a[7] == "15.16"
    assert "## Failed or incomplete runs" in text
    assert "| diverged | non-finite loss" in text and "| started |" in text and "| unreadable |" in text
    assert "- model_a, lr 0.25, seed 1" in text and "- all_cnn_c, lr 0.25, seed 0" in text  # never launched
    assert (out / "report.md").read_text() == text
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_lr_selected_on_validation_when_runs_have_a_split(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "all_cnn_c", 0.1, 0, test=0.20, val=0.40)  # best on test, worse on validation
    write_run(sweep, "all_cnn_c", 0.05, 0, test=0.25, val=0.30)
    text, _ = table.report([sweep], plot=False)
    row = next(line for line in text.splitlines() if line.startswith("| All-CNN-C"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2].startswith("0.05") and cells[3] == "validation" and cells[5] == "25.00"
    assert table.ON_TEST not in text


def test_reference_table_matches_paper_md():
    paper_md = Path(__file__).resolve().parents[2] / "shared" / "PAPER.md"  # beside the checkout
    if not paper_md.is_file():
        pytest.skip("PAPER.md not here")
    text = paper_md.read_text()
    for model, (paper, review) in runs.REFERENCE.items():
        assert f"| {paper:.2f}% | {review:.2f}% |" in text, model
    assert runs.ORDER == list(runs.REFERENCE)


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_no_runs_is_one_line_error(tmp_path, capsys, case):
    target = tmp_path / "sweep"
    if case == "empty":
        (target / "not-a-run").mkdir(parents=True)
    assert report.main([str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(target) in err
    assert not (target / "report.md").exists()


# --- runs as the lr study writes them: metrics.json, csv/metrics.csv, identity.json ---

CSV_HEADER = ("epoch,epoch_time_s,lr,optim/clip_norm,optim/clipped_frac,step,train/acc,train/grad_norm,train/loss,"
              "val/error,val/loss")


def study_config(lr: float, cap: float | None, epochs: int) -> dict:
    """The settings of a real run's identity.json that the report reads, in their places."""
    return {"model": {"family": "c", "variant": "allcnn", "width": 0.25, "dropout_input": 0.2},
            "data": {"source": "npz", "path": "data/cifar10-jpeg-arrays.npz", "preprocess": "gcn_zca",
                     "val_size": 5000, "augment": False, "batch_size": 128, "num_classes": 10},
            "optim": {"lr": lr, "momentum": 0.9, "weight_decay": 0.001, "milestones": [4], "gamma": 0.1,
                      "max_update_norm": cap},
            "trainer": {"max_epochs": epochs, "accelerator": "cpu"}, "seed": 0}


def write_study_run(root: Path, num: int, lr: float, cap: float | None, curve: list[tuple[float, float, float]],
                    test: float | None = None, wall: float = 600.0) -> Path:
    """curve: (val error, train loss, train acc) per epoch; test None = killed before metrics.json."""
    run = root / f"{num}_lr{lr}_cap{cap}"
    write_identity(run, study_config(lr, cap, epochs=6))
    (run / "csv").mkdir()
    rows, step = [CSV_HEADER], 0
    for epoch, (val, loss, acc) in enumerate(curve):
        step += 352
        lr_now = lr * (0.1 if epoch >= 4 else 1)
        clip = "" if cap is None else f"{cap / lr_now}"
        clipped = "" if cap is None else ("0.5" if epoch == 0 else "0.25")
        rows.append(f"{epoch},,,,,{step},,,,{val},{loss - 0.1}")
        seconds = 24.0 if (epoch, cap) == (1, 0.125) else 25.0
        rows.append(f"{epoch},{seconds},{lr_now},{clip},{clipped},{step},{acc},1.5,{loss},,")
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    if test is not None:
        m = {"status": "ok", "model": "all_cnn_c", "network": "All-CNN-C", "family": "c", "variant": "allcnn",
             "width": 0.25, "data": "npz", "preprocess": "gcn_zca", "augment": False, "lr": lr, "seed": 0,
             "epochs": len(curve), "batch_size": 128, "params": 86714, "test_error": test,
             "val_error": curve[-1][0], "wall_time_s": wall, "device": "cpu", "precision": "32-true"}
        (run / "metrics.json").write_text(json.dumps(m, indent=2))
    return run


LEARNS = [(0.70, 1.90, 0.30), (0.55, 1.50, 0.45), (0.45, 1.20, 0.58), (0.40, 1.05, 0.63), (0.32, 0.85, 0.70),
          (0.31, 0.80, 0.72)]
DIES = LEARNS[:2] + [(0.90, 2.3026, 0.100), (0.90, 2.3024, 0.099), (0.90, 2.3026, 0.101), (0.90, 2.3025, 0.1)]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The lr study in small: lr 0.25 dies at epoch 3, three capped lrs and lr 0.05 without the cap train,
    one more run was killed after two epochs. The page and figure go where `make lr-study` puts them."""
    root = tmp_path_factory.mktemp("study")
    sweep = root / "multirun" / "lr_study_cpu" / "x"
    write_study_run(sweep, 0, 0.25, 0.125, DIES, test=0.9)
    write_study_run(sweep, 1, 0.1, 0.125, [(v - 0.02, lo, a) for v, lo, a in LEARNS], test=0.29, wall=610.0)
    write_study_run(sweep, 2, 0.05, 0.125, LEARNS, test=0.30, wall=605.0)
    write_study_run(sweep, 3, 0.01, 0.125, [(v + 0.1, lo, a) for v, lo, a in LEARNS], test=0.41)
    write_study_run(sweep, 0, 0.05, None, [(v + 0.015, lo, a) for v, lo, a in LEARNS], test=0.32, wall=590.0)
    write_study_run(sweep, 4, 0.001, 0.125, LEARNS[:2])  # killed
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    md, png = root / "docs" / "RESULTS.md", root / "docs" / "figures" / "lr_study_curves.png"
    figure_text = []
    original = pages.save_figure

    def save(fig, path):  # what the figure says, read from its text artists before it is written
        figure_text.append("\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)))
        figure_text.append(fig)
        original(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(curves, "save_figure", save)
        rc = report.main([str(sweep), "--curves", "--md", str(md), "--png", str(png)])
    assert rc == 0
    return {"sweep": sweep, "md": md, "png": png, "text": md.read_text(), "figure_text": figure_text[0],
            "figure": figure_text[1]}


def table_rows(text: str) -> dict[str, list[str]]:
    return {cells[1]: cells for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.split("|")]]}


def test_curves_table_one_row_per_run_with_its_outcome(study):
    rows = table_rows(study["text"])
    assert set(rows) - {"run", "---"} == {"0_lr0.25_cap0.125", "1_lr0.1_cap0.125", "2_lr0.05_cap0.125",
                                          "3_lr0.01_cap0.125", "0_lr0.05_capNone", "4_lr0.001_cap0.125"}
    dead = rows["0_lr0.25_cap0.125"]
    assert dead[2:5] == ["All-CNN-C", "0.25", "0.125"] and dead[11] == "died at epoch 3" and dead[10] == "31"
    assert dead[7] == "55.00 (2)"  # best validation error, before it died
    capped, plain = rows["2_lr0.05_cap0.125"], rows["0_lr0.05_capNone"]
    assert capped[4] == "0.125" and plain[4] == "none"
    assert (capped[8], plain[8]) == ("30.00", "32.00") and (capped[6], plain[6]) == ("31.00", "32.50")
    assert capped[11] == "trained to the end (6 epochs)" and capped[12:14] == ["24.0, 25.0", "10.1 min"]
    assert plain[10] == "–"  # no cap: nothing logged
    killed = rows["4_lr0.001_cap0.125"]
    assert killed[2] == "All-CNN-C" and killed[8] == "–"
    assert killed[11] == "no metrics.json (killed or still running) after 2 epochs"
    order = [line.split("|")[1].strip() for line in study["text"].splitlines() if line.startswith("| ")][2:]
    assert order.index("2_lr0.05_cap0.125") + 1 == order.index("0_lr0.05_capNone")  # lr descending, capped first


def test_curves_findings_come_from_the_numbers(study):
    text = study["text"]
    assert ("- Trained to the end: lr 0.1 (cap 0.125), lr 0.05 (cap 0.125), lr 0.05 (no cap), "
            "lr 0.01 (cap 0.125).") in text
    assert "- Lowest final validation error: lr 0.1 (cap 0.125), 29.00% (test error 29.00%)." in text
    assert ("- lr 0.25 (cap 0.125) died at epoch 3 after reaching 55.00% validation error at epoch 2: at chance from "
            "then on (last epoch: train loss 2.303, ln 10 = 2.303; train accuracy 10.0%); test error 90.00%.") in text
    assert ("- At lr 0.05, cap 0.125 vs no cap: test error 30.00% vs 32.00%, final validation error 31.00% vs "
            "32.50%, epoch time (fastest, median) 24.0, 25.0 s vs 25.0, 25.0 s: the cap gains 2.00 points of test "
            "error (one seed each); "
            "the cap bound 50% of the steps of epoch 1 and 31% of the steps before the first lr drop.") in text
    assert "- lr 0.001 (cap 0.125): no metrics.json (killed or still running) after 2 epochs." in text
    assert "No run died" not in text


def test_curves_say_when_no_run_died(tmp_path):
    write_study_run(tmp_path / "sweep", 0, 0.05, 0.125, LEARNS, test=0.3)
    text, _ = curves.curves_report([tmp_path / "sweep"], plot=False)
    assert "- No run died: none ended at chance by the rule above." in text


def test_curves_page_and_figure_say_what_was_run(study):
    label = ("Not the paper's setting: width 0.25, 6 epochs, JPEG copy of CIFAR-10 (cifar10-jpeg-arrays.npz), "
             "5,000 training images held out for validation, update cap 0.125 or none "
             "(the paper: width 1, 350 epochs, CIFAR-10, no augmentation).")
    text, drawn = study["text"], study["figure_text"]
    assert text.startswith(f"# All-CNN-C: learning rate and update cap\n\n**{label}**\n")
    assert " ".join(drawn.split()).count(label) == 1  # wrapped over lines in the suptitle
    for legend in ("lr 0.25, cap 0.125 — died at epoch 3", "lr 0.1, cap 0.125", "lr 0.05, cap 0.125",
                   "lr 0.05, no cap", "lr 0.001, cap 0.125 — started"):
        assert legend in drawn.splitlines(), legend
    assert "lr ×0.1" in drawn and "chance: ln 10" in drawn
    val_ax = study["figure"].axes[0]
    assert [line.get_xdata()[0] for line in val_ax.get_lines() if line.get_linestyle() == ":"] == [4]
    assert f"Generated by `python src/report.py {study['sweep']} --curves --md {study['md']} --png {study['png']}`" \
        in text
    assert "![learning curves](figures/lr_study_curves.png)" in text and "device (precision) the runs recorded: " \
        "cpu (32-true)" in text
    png = study["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000


def test_curves_page_keeps_its_hand_written_part(study, tmp_path):
    md = tmp_path / "RESULTS.md"
    hand = "\nWhy lr 0.25 dies: see above.\n"
    generated = study["text"].split(pages.KEEP_MARKER)[0].replace("| 1_lr0.1", "| stale")
    md.write_text(generated + pages.KEEP_MARKER + hand)
    assert report.main([str(study["sweep"]), "--curves", "--md", str(md), "--no-plot"]) == 0
    text = md.read_text()
    assert text.endswith(pages.KEEP_MARKER + hand) and text.count(pages.KEEP_MARKER) == 1
    assert "| stale" not in text and "| 1_lr0.1_cap0.125 |" in text
    assert "| 2_lr0.05_cap0.125 |" in text and "![learning curves]" not in text


@pytest.mark.parametrize("curve, expected", [
    (DIES, (3, True)),
    (LEARNS, (None, True)),
    ([(0.9, 2.31, 0.10)] * 3, (1, False)),                    # never left chance
    ([(0.9, 2.302, 0.10), *LEARNS[:2]], (None, True)),        # slow start, then learns: not dead
    ([*LEARNS[:3], (0.9, 2.3026, 0.11)], (4, True)),          # at chance in its last epoch only
    ([(0.9, 2.3026, 0.13)] * 2, (None, True)),                # 13% accuracy is above chance + 2 points
    ([], (None, True)),
])
def test_died_at_rule(curve, expected):
    series = {"train/loss": {e: lo for e, (_, lo, _) in enumerate(curve)},
              "train/acc": {e: a for e, (_, _, a) in enumerate(curve)}}
    assert curves.died_at(series, 10) == expected


def test_table1_keeps_runs_apart_that_differ_only_in_the_cap(study, tmp_path):
    text, _ = table.report([study["sweep"]], out=tmp_path, plot=False)
    row = table_rows(text)["All-CNN-C"]
    assert row[2] == "0.1, cap 0.125 (of 5)" and row[3] == "validation" and row[4] == "0" and row[5] == "29.00"
    assert "| 0.001, cap 0.125 | 0 | started |" in text
    assert "**Not the paper's setting: width 0.25, 6 epochs, JPEG copy of CIFAR-10" in text


def test_cap_from_metrics_json_when_there_is_no_saved_config(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "all_cnn_c", 0.05, 0, test=0.30, val=0.31, max_update_norm=0.125)
    write_run(sweep / "plain", "all_cnn_c", 0.05, 0, test=0.20, val=0.32, max_update_norm=None)
    for run in sweep.rglob("identity.json"):  # folders that record no settings: metrics.json says the cap
        run.unlink()
    text, _ = table.report([sweep], plot=False)
    assert table_rows(text)["All-CNN-C"][2:6] == ["0.05, cap 0.125 (of 2)", "validation", "0", "30.00"]
    assert "update cap 0.125 or none" in text


def test_augmented_run_is_its_own_row_and_stays_out_of_the_rank_order(tmp_path):
    plain, augmented = tmp_path / "plain", tmp_path / "augmented"
    write_run(plain, "all_cnn_c", 0.05, 0, test=0.30, augment=False)
    write_run(plain, "model_c", 0.05, 0, test=0.20, augment=False)  # ahead of All-CNN-C: the paper's claim fails
    write_run(augmented, "all_cnn_c", 0.05, 0, test=0.10, augment=True)  # would carry the claim if pooled
    text, _ = table.report([plain, augmented], plot=False)
    rows = table_rows(text)
    assert rows["All-CNN-C"][4:8] == ["0", "30.00", "9.08", "11.17"]  # not the mean of the two: 20.00
    assert rows["All-CNN-C, augmented"][4:8] == ["0", "10.00", "7.25", "–"]
    assert "| All-CNN-C beats Model C | 9.08 vs 9.74 | 30.00 vs 20.00 | no |" in text
    assert "over the 2 networks" in text and "augmentation on some runs" in text


def test_table1_chart_and_header_state_the_settings(tmp_path, monkeypatch):
    drawn = []
    original = pages.save_figure
    monkeypatch.setattr(table, "save_figure", lambda fig, path: (drawn.append(
        " ".join(" ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)).split())), original(fig, path)))
    sweep = tmp_path / "sweep"
    write_run(sweep, "all_cnn_c", 0.05, 0, test=0.3)
    write_run(sweep, "all_cnn_c", 0.05, 2, test=0.3)
    text, _ = table.report([sweep])
    label = ("Not the paper's setting: width 0.25, 1 epoch, arrays file (the paper: width 1, 350 epochs, CIFAR-10, "
             "no augmentation).")
    assert f"**{label}**" in text.splitlines()[2]
    assert f"ours: n{label[1:]} Seeds: 0, 2." in drawn[0]
    assert "Test error: ours vs the paper (Table 1) vs the review" in drawn[0]


def test_settings_label_says_when_runs_match_the_paper(tmp_path):
    run = write_study_run(tmp_path, 0, 0.05, None, LEARNS, test=0.1)
    cfg = study_config(0.05, None, epochs=350)
    cfg["model"]["width"], cfg["data"] = 1.0, {"source": "cifar10", "preprocess": "gcn_zca", "val_size": 0,
                                               "augment": False}
    write_identity(run, cfg)
    assert runs.settings_label([runs.read_run(run)]) == ("The paper's setting (width 1, 350 epochs, CIFAR-10, "
                                                             "no augmentation).")
    cfg["data"]["augment"] = True
    write_identity(run, cfg)
    assert runs.settings_label([runs.read_run(run)]).startswith(
        "Not the paper's setting: augmentation (flips, translations) (the paper:")


def test_curves_errors_are_one_line_and_write_nothing(tmp_path, capsys, study):
    sweep = tmp_path / "sweep"
    write_run(sweep, "all_cnn_c", 0.05, 0, test=0.3)  # no csv/metrics.csv: nothing to draw
    assert report.main([str(sweep), "--curves"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "csv/metrics.csv" in err
    assert not (sweep / "curves.md").exists() and not (sweep / "curves.png").exists()
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert report.main([str(study["sweep"]), "--curves", "--md", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {folder}: is a directory; give a file name"
    assert list(folder.iterdir()) == [] and not (study["sweep"] / "curves.png").exists()


def test_a_refused_page_write_is_one_line_and_keeps_the_old_page(study, tmp_path, capsys, monkeypatch):
    import errno
    import os

    md = tmp_path / "RESULTS.md"
    md.write_text("old page\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)  # where a full disk may first say so
    assert report.main([str(study["sweep"]), "--curves", "--md", str(md), "--no-plot"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "RESULTS.md" in err[0] and "ENOSPC" in err[0]
    assert md.read_text() == "old page\n" and [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]

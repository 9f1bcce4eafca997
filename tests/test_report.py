"""src/report.py: lr chosen per model (on validation when there is one, else on test), mean ± std over
seeds, the paper's and the review's errors, failed/incomplete/missing runs listed, bad folders refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allconv import report


def write_run(root: Path, model: str, lr: float, seed: int, test: float | None = None, val: float | None = None,
              status: str = "ok", **extra) -> Path:
    run = root / f"{model}_lr{lr}_s{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n- optim.lr={lr}\n- seed={seed}\n")
    if status == "incomplete":
        return run
    m = {"status": status, "model": model, "lr": lr, "seed": seed}
    if status == "ok":
        names = {"all_cnn_c": "All-CNN-C", "model_a": "Model A"}
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
    write_run(sweep, "model_a", 0.05, 1, status="incomplete")  # killed: .hydra but no metrics.json
    bad = write_run(sweep, "model_a", 0.25, 0, test=0.1)
    (bad / "metrics.json").write_text('{"status": "ok", "test_er')  # torn file from a dead disk
    text, out = report.report([sweep])

    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    c = [c.strip() for c in rows["All-CNN-C"].split("|")]
    assert c[2].startswith("0.1") and c[3] == report.ON_TEST and c[4] == "0, 1"
    assert c[5] == "21.00 ± 1.41" and c[6] == "9.08" and c[7] == "11.17" and c[8] == "1,000" and c[9] == "1.5 min"
    a = [c.strip() for c in rows["Model A"].split("|")]
    assert a[2].startswith("0.05") and a[5] == "40.00"  # one seed: no std and a[6] == "12.47" and a[7] == "15.16"
    assert "## Failed or incomplete runs" in text
    assert "| failed | non-finite loss" in text and "| incomplete |" in text and "| unreadable |" in text
    assert "- model_a, lr 0.25, seed 1" in text and "- all_cnn_c, lr 0.25, seed 0" in text  # never launched
    assert (out / "report.md").read_text() == text
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_lr_selected_on_validation_when_runs_have_a_split(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep, "all_cnn_c", 0.1, 0, test=0.20, val=0.40)  # best on test, worse on validation
    write_run(sweep, "all_cnn_c", 0.05, 0, test=0.25, val=0.30)
    text, _ = report.report([sweep], plot=False)
    row = next(line for line in text.splitlines() if line.startswith("| All-CNN-C"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2].startswith("0.05") and cells[3] == "validation" and cells[5] == "25.00"
    assert report.ON_TEST not in text


def test_reference_table_matches_paper_md():
    paper_md = Path("/work/shared/PAPER.md")
    if not paper_md.is_file():
        pytest.skip("PAPER.md not here")
    text = paper_md.read_text()
    for model, (paper, review) in report.REFERENCE.items():
        assert f"| {paper:.2f}% | {review:.2f}% |" in text, model
    assert report.ORDER == list(report.REFERENCE)


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_no_runs_is_one_line_error(tmp_path, capsys, case):
    target = tmp_path / "sweep"
    if case == "empty":
        (target / "not-a-run").mkdir(parents=True)
    assert report.main([str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(target) in err
    assert not (target / "report.md").exists()

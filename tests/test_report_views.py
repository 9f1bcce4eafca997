"""The report's Table 1 comparison with the paper (Spearman's rho, the paper's claims one by one), the grid view
(learned / near chance / died / diverged per cell, one heatmap per cap) and malformed metrics.json files, which are
listed as unreadable and never ranked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allconv import models, report
from allconv.report import grid, runs, table
from conftest import write_identity

NAMES = {m: table.NAME[m] for m in runs.ORDER}


def write_table_run(root: Path, model: str, test: float, lr: float = 0.05, cap: float | None = 0.125,
                    curve: list[tuple[float, float, float]] | None = None, status: str = "ok",
                    error: str = "", seed: int = 0, final_weights: str = "zero", spread: float | None = None) -> Path:
    """A finished run folder as train.py leaves it: metrics.json, identity.json, csv/metrics.csv."""
    run = root / f"{model}_lr{lr}_cap{cap}_{final_weights}_s{seed}"
    family, variant = next((f, v) for f, v in models.all_networks() if models.config_name(f, v) == model)
    config = {"model": {"family": family, "variant": variant, "width": 0.25, "final_weights": final_weights},
              "data": {"source": "npz", "path": "cifar10-jpeg-arrays.npz", "num_classes": 10, "augment": False},
              "optim": {"lr": lr, "max_update_norm": cap}, "trainer": {"max_epochs": 2}, "seed": seed}
    write_identity(run, config)
    (run / "csv").mkdir()
    curve = curve or [(2.0, 0.3, 0.5), (1.6, 0.45, 0.9)]  # (train loss, train accuracy, gradient norm) per epoch
    rows = ["epoch,train/loss,train/acc,train/grad_norm,step"] + [
        f"{e},{loss},{acc},{grad},{e}" for e, (loss, acc, grad) in enumerate(curve)]
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    m = {"status": status, "model": model, "network": NAMES[model], "lr": lr, "seed": seed, "max_update_norm": cap}
    m |= {"test_error": test, "epochs": 2, "width": 0.25, "data": "npz"} if status == "ok" else {"error": error}
    if spread is not None:
        m["test_score_spread"] = spread
    (run / "metrics.json").write_text(json.dumps(m))
    return run


# Test error (%) per network in the paper's order: the paper's ranking exactly, then with two networks swapped.
def _as_paper(scale: float = 2.0) -> dict[str, float]:
    return {m: scale * paper for m, (paper, _) in runs.REFERENCE.items()}


def test_spearman_is_one_for_the_paper_order_and_drops_when_swapped():
    errors = [runs.REFERENCE[m][0] for m in runs.ORDER]
    assert table.spearman([2 * e + 1 for e in errors], errors) == pytest.approx(1.0)
    assert table.spearman([-e for e in errors], errors) == pytest.approx(-1.0)
    swapped = list(errors)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # Model A and Strided-CNN-A: neighbours in rank
    rho = table.spearman(swapped, errors)
    n = len(errors)
    assert rho == pytest.approx(1 - 6 * (1 + 1) / (n * (n * n - 1)))  # Spearman's formula without ties
    assert table.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None and table.spearman([1, 2], [1, 2]) is None


def test_claims_follow_the_paper_and_fail_where_ours_disagree(tmp_path):
    ours = _as_paper()
    ours["all_cnn_b"], ours["model_b"] = 21.0, 20.5    # All-CNN-B now worse than Model B (and ConvPool-CNN-B)
    ours["strided_cnn_c"] = 1.0                          # Strided-CNN-C now the best of family C
    for model, error in ours.items():
        write_table_run(tmp_path, model, error / 100)
    rows, _, _ = table.summarise(runs.find_runs([tmp_path]))
    found = {c.text: c for c in table.claims(rows)}
    assert set(found) == {"All-CNN-A beats Model A", "ConvPool-CNN-A beats All-CNN-A", "All-CNN-B beats Model B",
                          "All-CNN-B beats ConvPool-CNN-B", "All-CNN-C beats Model C",
                          "All-CNN-C beats ConvPool-CNN-C", "Strided-CNN-A is last of family A",
                          "Strided-CNN-B is last of family B", "Strided-CNN-C is last of family C"}
    failed = sorted(t for t, c in found.items() if not c.holds)
    assert failed == ["All-CNN-B beats ConvPool-CNN-B", "All-CNN-B beats Model B", "Strided-CNN-C is last of family C"]
    assert found["All-CNN-B beats Model B"].paper == (9.10, 10.20) and found["All-CNN-B beats Model B"].ours == (21.0,
                                                                                                                20.5)
    text, _ = table.report([tmp_path], plot=False)
    assert "6 of 9 of the paper's within-family comparisons hold at this scale." in text
    assert "| All-CNN-B beats Model B | 9.10 vs 10.20 | 21.00 vs 20.50 | no |" in text
    assert "Spearman's rank correlation over the 12 networks: ours vs the paper +0." in text


def test_grid_outcomes_and_page(tmp_path):
    write_table_run(tmp_path, "all_cnn_c", 0.40, lr=0.1)
    write_table_run(tmp_path, "all_cnn_c", 0.85, lr=0.01)                                     # near chance
    write_table_run(tmp_path, "model_a", 0.90, lr=0.1, curve=[(2.3026, 0.1, 0.3), (2.3026, 0.1, 0.01)])  # dead
    write_table_run(tmp_path, "model_a", 0.88, lr=0.05, curve=[(2.3026, 0.1, 0.3), (2.3026, 0.1, 0.3)])  # slow
    write_table_run(tmp_path, "model_a", 0.50, lr=0.01)
    write_table_run(tmp_path, "model_a", 0.0, lr=0.1, cap=None, status="failed",
                    error="non-finite loss at epoch 1, step 3 of the epoch (lr=0.1)")               # diverged
    found = {(c.model, c.lr, c.cap): c.outcome for c in grid.cells([grid.trace(r) for r in
                                                                    runs.find_runs([tmp_path])])}
    assert found == {("all_cnn_c", 0.1, 0.125): "learned", ("all_cnn_c", 0.01, 0.125): "near chance",
                     ("model_a", 0.1, 0.125): "died", ("model_a", 0.05, 0.125): "at chance",
                     ("model_a", 0.01, 0.125): "learned",
                     ("model_a", 0.1, None): "diverged"}
    assert report.main([str(tmp_path), "--grid"]) == 0
    page = (tmp_path / "grid.md").read_text()
    assert "| Model A | **died** (90.0) | 88.0 (at chance) | 50.0 |" in page
    assert "| All-CNN-C | 40.0 | – | 85.0 (near chance) |" in page
    assert "## no cap" in page and "| Model A | **diverged** | – | – |" in page
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_counts_seeds_per_cell_and_keeps_other_settings_apart(tmp_path):
    dead = [(2.3026, 0.1, 0.3), (2.3026, 0.1, 0.01)]
    write_table_run(tmp_path, "all_cnn_c", 0.90, lr=0.25, seed=0, curve=dead)
    write_table_run(tmp_path, "all_cnn_c", 0.60, lr=0.25, seed=1)
    write_table_run(tmp_path, "all_cnn_c", 0.50, lr=0.25, seed=2)
    at_chance = [(2.3026, 0.1, 0.3), (2.3026, 0.1, 0.2)]  # the class bias still moves: a gradient, but ...
    write_table_run(tmp_path, "all_cnn_c", 0.90, lr=0.25, seed=3, curve=at_chance, spread=0.0)  # ... no image through
    write_table_run(tmp_path, "all_cnn_c", 0.90, lr=0.25, seed=4, curve=at_chance, spread=0.02)  # a slow start
    write_table_run(tmp_path, "all_cnn_c", 0.70, lr=0.25, seed=0, final_weights="init")
    write_table_run(tmp_path, "all_cnn_c", 0.40, lr=0.1, seed=0, final_weights="init")
    found = grid.cells([grid.trace(r) for r in runs.find_runs([tmp_path])])
    assert {c.setting for c in found} == {(("model.final_weights", "zero"),), (("model.final_weights", "init"),)}
    assert report.main([str(tmp_path), "--grid"]) == 0
    page = (tmp_path / "grid.md").read_text()
    # Three seeds of one cell: the median, and the seed that died counted, not hidden behind the first seed.
    assert "## cap 0.125, model.final_weights=zero" in page
    assert "| All-CNN-C | 90.0 (**died 2/5**, at chance 1/5) | – |" in page
    # The other setting is its own panel, never a fourth seed.
    assert "## cap 0.125, model.final_weights=init" in page and "| All-CNN-C | 70.0 | 40.0 |" in page
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_long_value_in_a_saved_config_names_its_panel_in_80_characters(tmp_path):
    crafted = write_table_run(tmp_path, "all_cnn_c", 0.40, lr=0.1) / "identity.json"
    crafted.write_text(crafted.read_text().replace('"model.final_weights": "zero"',
                                                   '"model.final_weights": "' + "x" * 10_000 + '"'))
    write_table_run(tmp_path, "all_cnn_c", 0.50, lr=0.1, seed=1)
    found = grid.cells([grid.trace(r) for r in runs.find_runs([tmp_path])])
    assert sorted(len(v) for c in found for _, v in c.setting) == [4, 80]


@pytest.mark.parametrize("content, reason", [
    ('{"status": "ok", "model": "all_cnn_c", "lr": 0.05, "test_error": NaN}', "test_error=nan"),
    ('{"status": "ok", "model": "all_cnn_c", "lr": 0.05, "test_error": -0.5}', "test_error=-0.5"),
    ('{"status": "ok", "model": ["all_cnn_c"], "lr": 0.05, "test_error": 0.1}', "model=['all_cnn_c']"),
    ('{"status": "ok", "model": "all_cnn_c", "lr": "fast", "test_error": 0.1}', "lr='fast'"),
    ('{"status": "ok", "model": "all_cnn_c", "lr": 0.05, "seed": 1.5, "test_error": 0.1}', "seed=1.5"),
    ('[1, 2, 3]', "holds a list"),
    ('{"status": "ok", "model": "all_cnn_c", "lr": 0.05, "test_error": 0.1', "Expecting"),
])
def test_malformed_metrics_are_listed_never_ranked(tmp_path, content, reason):
    good = write_table_run(tmp_path, "all_cnn_c", 0.30, lr=0.1)
    bad = tmp_path / "bad_run"
    write_identity(bad, {"model": {"family": "c", "variant": "allcnn"}, "optim": {"lr": 0.05}})
    (bad / "metrics.json").write_text(content)
    found = {r.path.name: r for r in runs.find_runs([tmp_path])}
    assert found["bad_run"].status == "unreadable" and reason in found["bad_run"].error
    assert report.main([str(tmp_path), "--no-plot"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| All-CNN-C | 0.1, cap 0.125 (of 1) |" in text and "| 30.00 |" in text  # the finite run is the one ranked
    assert "unreadable" in text and good.name != "bad_run"
    assert report.main([str(tmp_path), "--grid", "--no-plot"]) == 0
    assert report.main([str(tmp_path), "--curves", "--no-plot"]) == 0


def test_a_malformed_saved_config_is_ignored_not_a_crash(tmp_path):
    run = write_table_run(tmp_path, "all_cnn_c", 0.30)
    (run / "identity.json").write_text('{"settings": {"model": [1, 2], "optim.max_update_norm": "banana"}}')
    assert runs.read_run(run).config == {} and runs.read_run(run).status == "finished"
    assert report.main([str(tmp_path), "--no-plot"]) == 0

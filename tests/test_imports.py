"""Imports point one way: pictures and models sit below the run-setup layer, and no allconv module imports
itself back through others (every import counts, those inside functions too)."""

from __future__ import annotations

import ast
import subprocess

from conftest import PYTHON, SRC

PACKAGE = SRC / "allconv"
RUN_SETUP = {"cli", "training", "callbacks", "run_folder", "run_record", "sweep_folder", "resume", "local_parallel",
             "ddp", "wandb_logger", "visualize_run", "visualize_callback", "csv_logger"}


def import_graph() -> dict[str, set[str]]:
    """allconv module -> the allconv modules it imports anywhere in its source."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "allconv":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("allconv."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("allconv.")}
        graph[name] = found & modules - {name}
    return graph


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert graph["figures"] and graph["cli"]  # the parser sees imports (a broken walk would pass anything)
    visiting, done, cycles = [], set(), []

    def visit(m):
        if m in visiting:
            cycles.append(visiting[visiting.index(m):] + [m])
            return
        if m in done:
            return
        visiting.append(m)
        for n in sorted(graph[m]):
            visit(n)
        visiting.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert cycles == []


def test_pictures_and_models_import_no_run_setup_module():
    for module in ("figures", "visualize", "models", "learning_curve", "preprocessing"):
        code = f"import sys, allconv.{module}; print(sorted(m for m in sys.modules if m.startswith('allconv.')))"
        out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(SRC)}).stdout
        loaded = {m.split(".")[1] for m in ast.literal_eval(out)}
        assert loaded and not loaded & RUN_SETUP, (module, loaded & RUN_SETUP)

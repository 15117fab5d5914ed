"""The executed example notebooks still run: their code cells are executed in order (no Jupyter needed)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_has_outputs(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") for c in code), "commit the notebook executed (outputs present)"
    namespace: dict = {}
    for cell in code:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)

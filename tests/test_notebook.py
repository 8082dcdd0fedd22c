"""The walkthrough notebook runs top to bottom (smallest settings), without Jupyter: its code cells
are read from the .ipynb JSON and executed in order in one namespace."""

import json
import os

import matplotlib

NB = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "walkthrough.ipynb"
)


def test_notebook_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("LD4LG_NOTEBOOK_SMALL", "1")
    monkeypatch.chdir(os.path.dirname(NB))
    cells = [c for c in json.load(open(NB))["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 8
    ns = {}
    src = lambda c: "".join(c["source"]).replace(
        '"runs/notebook"', repr(str(tmp_path))
    )  # write into the test's tmp dir
    for i, cell in enumerate(cells):
        exec(compile(src(cell), f"walkthrough cell {i}", "exec"), ns)

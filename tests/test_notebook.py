"""demo.ipynb runs top to bottom with papermill against a checkpoint trained here, and ships clean."""

import sys

import nbformat
import papermill
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from test_search import tiny_run
from utils import REPO_DIR

NOTEBOOK = REPO_DIR / "demo.ipynb"
KERNEL = "python3"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_ships_clean_with_its_parameters_first():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert set(papermill.inspect_notebook(str(NOTEBOOK))) == {"checkpoint", "data_dir"}
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"
        # only calls into the repo: anything worth defining belongs in search.py, plots.py or evaluate.py
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines())


def test_notebook_runs_top_to_bottom(tmp_path_factory, shapes_dir, tmp_path):
    run = tiny_run(tmp_path_factory, shapes_dir)
    argv = KernelSpecManager().get_kernel_spec(KERNEL).argv
    # jupyter_client runs a spec that says "python" with this interpreter; any other would miss this venv's packages
    if argv[0] not in {"python", "python3", sys.executable}:
        pytest.fail(f"the {KERNEL!r} Jupyter kernel runs {argv[0]}, not {sys.executable}; "
                    f"run `{sys.executable} -m ipykernel install --user`")
    out = tmp_path / "demo.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), kernel_name=KERNEL, cwd=str(REPO_DIR), progress_bar=False,
                               parameters={"checkpoint": str(run / "best"), "data_dir": str(shapes_dir)},
                               start_timeout=180)  # papermill raises on any cell error, naming the cell
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for tag in ("text2image", "image2text"):
        cell = next(c for c in code_cells(nb) if tag in c.metadata.get("tags", []))
        pictures = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(pictures) == 3, f"the {tag} cell showed {len(pictures)} figures, expected 3"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "text->image" in printed and "R@10" in printed  # the recall table

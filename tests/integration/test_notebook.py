"""examples/inspect_growth.ipynb runs headless top to bottom and shows its figures.

Executed with nbclient on the ``python3`` kernel of this interpreter, with FLM_RUN_DIR
pointing at an empty directory, so the notebook trains a short tiny schedule there with the
real ``train-stage`` (the path a fresh clone takes). The stored notebook must carry no outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from growth.runs import StageDir

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "inspect_growth.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_and_shows_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLM_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny models, no thread contention
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else ""
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, [o.output_type for o in outputs]
    assert (StageDir(tmp_path / "run" / "tiny_s3").final / "config.json").is_file()
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "trained a stand-in" in text and "new layers:" in text


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))

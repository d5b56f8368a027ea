"""Execute the tutorial notebooks in smoke mode (``SC_DTA_SMOKE=1``): every cell must run without error."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = ["quickstart.ipynb", "fetal_cardiomyocytes.ipynb"]
CELL_TIMEOUT = 300  # seconds per cell


def _smoke_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SC_DTA_SMOKE": "1",
            "MPLBACKEND": "Agg",
            "SC_DTA_PROGRESS": "0",
            "SC_DTA_DEVICE": "cpu",
            "SC_DTA_CACHE_DIR": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    # the kernel must import this checkout's sc_dta even where it is not installed
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(TUTORIALS / name, as_version=4)
    # The kernel inherits the environment of this process; set it for the kernel only.
    for key, value in _smoke_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        allow_errors=False,
    )
    t0 = time.perf_counter()
    try:
        client.execute(cwd=str(tmp_path))
    except nbclient.exceptions.CellExecutionError as e:  # pragma: no cover - the failure message is the point
        pytest.fail(f"{name}: a cell failed in smoke mode:\n{e}")
    elapsed = time.perf_counter() - t0
    print(f"{name}: executed in {elapsed:.1f} s")

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.get("execution_count") for c in code_cells), "not every code cell was executed"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def _notebook_json(name: str) -> dict:
    return json.loads((TUTORIALS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_saved_clean(name: str) -> None:
    """Notebooks are committed without outputs, execution counts or per-user metadata."""
    nb = _notebook_json(name)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}
    for cell in nb["cells"]:
        assert cell.get("metadata", {}) == {}, cell.get("id")
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], cell.get("id")
            assert cell["execution_count"] is None, cell.get("id")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_docs_link_to_tutorial(name: str) -> None:
    """docs/tutorials/<name> is a symlink to the notebook, so the docs render the tested file."""
    link = REPO / "docs" / "tutorials" / name
    assert link.is_symlink(), f"{link} should be a symlink to ../../tutorials/{name}"
    assert os.readlink(link) == f"../../tutorials/{name}"
    assert link.resolve() == (TUTORIALS / name).resolve()


def test_smoke_switch_is_the_only_difference() -> None:
    """Each notebook reads SC_DTA_SMOKE in one place: the configuration cell near the top."""
    for name in NOTEBOOKS:
        cells = [c for c in _notebook_json(name)["cells"] if c["cell_type"] == "code"]
        readers = [i for i, c in enumerate(cells) if "SC_DTA_SMOKE" in "".join(c["source"])]
        assert readers == [0], f"{name}: SC_DTA_SMOKE is read in code cells {readers}, expected only the first"
        later = ["".join(c["source"]) for c in cells[1:]]
        assert not any("if SMOKE" in s or "if not SMOKE" in s for s in later), f"{name}: SMOKE branches after config"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))

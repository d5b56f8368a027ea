"""The README's Python example runs as written (at a smaller size), so a newcomer's first copy-paste works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    text = README.read_text()
    section = text[text.index("## In Python") :]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README: no python block under '## In Python'"
    return match.group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, one_torch_thread):
    code = _python_block()
    small = {
        "dta.datasets.simulated_grn(\n    3000, 150,": "dta.datasets.simulated_grn(\n    300, 150,",
        "dta.tl.train_adapter(adata, model, seed=0)": "dta.tl.train_adapter(adata, model, seed=0, epochs=1)",
        "n_controls=10": "n_controls=2",
    }
    for old, new in small.items():
        assert old in code, f"README example changed: {old!r} not found; update this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with pytest.warns(UserWarning):  # one epoch on 300 cells learns nothing, and says so
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "target_shift.png").exists() and (tmp_path / "bio_dta.h5ad").exists()
    assert {"dta_shift_mean", "dta_shift_delete_mean", "coexpression_mean"} <= set(namespace["adata"].var.columns)

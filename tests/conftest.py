from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENEFORMER_DATA = Path(os.environ.get("SC_DTA_GENEFORMER_DATA", REPO.parent / "shared" / "data" / "geneformer"))


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch):
    """Every test gets its own cache directory, no progress bars and fresh settings."""
    import sc_dta as dta

    cache = tmp_path_factory.mktemp("sc_dta_cache")
    monkeypatch.setattr(dta.settings, "cache_dir", cache)
    monkeypatch.setattr(dta.settings, "progress", False)
    monkeypatch.setattr(dta.settings, "device", "cpu")
    monkeypatch.setattr(dta.settings, "dtype", "auto")
    yield


@pytest.fixture(scope="session")
def geneformer_data() -> Path:
    """The real Geneformer dictionaries and configs; skips when they are not available."""
    if not (GENEFORMER_DATA / "token_dictionary_gc104M.pkl").exists():
        pytest.skip(f"Geneformer reference data not found at {GENEFORMER_DATA}")
    return GENEFORMER_DATA


@pytest.fixture
def one_torch_thread():
    """Run a test's tiny models on one torch thread: much faster on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sc_dta as dta
from sc_dta._utils import autocast_dtype, get_anndata, resolve_device


def test_import_does_not_import_torch():
    code = "import sys, sc_dta; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cache_dir_from_environment(tmp_path):
    code = "import sc_dta; print(sc_dta.settings.cache_dir)"
    env = {"SC_DTA_CACHE_DIR": str(tmp_path / "c"), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(tmp_path / "c")


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="not 'auto' or a torch device"):
        resolve_device("gpu0")


def test_settings_validation():
    with pytest.raises(ValueError, match="batch_size_cells"):
        dta.settings.batch_size_cells = 0
    with pytest.raises(ValueError, match="dtype"):
        dta.settings.dtype = "float64"
    with pytest.raises(ValueError, match="device"):
        dta.settings.device = "tpu!"


def test_autocast_dtype_follows_settings(monkeypatch):
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(dta.settings, "dtype", "float32")
    assert autocast_dtype(torch.device("cuda")) is None


def test_get_anndata_mudata():
    import anndata as ad
    import mudata as md
    import numpy as np

    a = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    m = md.MuData({"rna": a})
    assert get_anndata(a) is a
    assert get_anndata(m) is m.mod["rna"]
    with pytest.raises(KeyError, match="atac"):
        get_anndata(m, mod="atac")
    with pytest.raises(TypeError, match="AnnData or MuData"):
        get_anndata(np.ones(3))

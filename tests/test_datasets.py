"""Tests of dta.datasets: registry schema, pooch downloads and Hugging Face snapshots, all offline.

Downloads are served by a loopback HTTP server started by the tests (127.0.0.1, random port).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from importlib import resources
from pathlib import Path

import pytest

import sc_dta as dta
from sc_dta.datasets import _fetch, _registry

sys.path.insert(0, str(Path(__file__).parent))

from _loopback import LoopbackServer, online_environment

HG38 = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY", "chrM"]
GENEFORMER_DICTS = {
    # registry name: (file in the shared reference data, upstream path in ctheodoris/Geneformer)
    "geneformer_v2_token_dictionary": "geneformer/token_dictionary_gc104M.pkl",
    "geneformer_v2_gene_median_dictionary": "geneformer/gene_median_dictionary_gc104M.pkl",
    "geneformer_v2_ensembl_mapping_dict": "geneformer/ensembl_mapping_dict_gc104M.pkl",
    "geneformer_v2_gene_name_id_dict": "geneformer/gene_name_id_dict_gc104M.pkl",
    "geneformer_v1_token_dictionary": "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl",
    "geneformer_v1_gene_median_dictionary": "geneformer/gene_dictionaries_30m/gene_median_dictionary_gc30M.pkl",
    "geneformer_v1_ensembl_mapping_dict": "geneformer/gene_dictionaries_30m/ensembl_mapping_dict_gc30M.pkl",
    "geneformer_v1_gene_name_id_dict": "geneformer/gene_dictionaries_30m/gene_name_id_dict_gc30M.pkl",
}


# --------------------------------------------------------------------------------------------------
# Loopback server and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    online_environment(monkeypatch)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_file_entry(monkeypatch, name: str, url: str, *, sha: str | None, filename: str | None = None) -> dict:
    """Put a test file entry into the (internal) registry for the duration of one test."""
    entry = {
        "name": name,
        "kind": "file",
        "url": url,
        "filename": filename or f"test/{name}.bin",
        "sha256": sha,
        "sha256_reason": None if sha else "test entry without hash",
        "size": 10,
        "licence": "test",
        "citation": "test",
        "description": "test",
    }
    monkeypatch.setitem(_registry._entries(), name, entry)
    return entry


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_schema():
    reg = dta.datasets.registry()
    files = {n: e for n, e in reg.items() if e["kind"] == "file"}
    models = {n: e for n, e in reg.items() if e["kind"] == "model"}
    for name, entry in files.items():
        assert entry["url"].startswith(("https://", "http://", "ftp://")), name
        for field in ("licence", "citation", "description"):
            assert isinstance(entry[field], str) and entry[field].strip(), (name, field)
        assert isinstance(entry["size"], int) and entry["size"] > 0, name
        if entry["sha256"] is None:
            assert entry["sha256_reason"].strip(), name
        else:
            assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert not entry["filename"].startswith("/") and ".." not in entry["filename"].split("/")
    # Every cache path is distinct, so no two entries overwrite each other.
    assert len({e["filename"] for e in files.values()}) == len(files)

    for chrom in HG38:
        entry = files[f"hg38_{chrom}"]
        assert entry["url"] == f"https://hgdownload.soe.ucsc.edu/goldenPath/hg38/chromosomes/{chrom}.fa.gz"
        assert entry["filename"].endswith(f"{chrom}.fa.gz")
    assert files["gencode_v44_basic_gtf"]["url"] == (
        "https://ftp.ebi.ac.uk/pub/databases/gencode/Gencode_human/release_44/gencode.v44.basic.annotation.gtf.gz"
    )

    for name, entry in models.items():
        assert re.fullmatch(r"[0-9a-f]{40}", entry["revision"]), name
        for field in ("licence", "citation", "description"):
            assert entry[field].strip(), (name, field)
    assert models["enformer"]["repo_id"] == "EleutherAI/enformer-official-rough"
    assert models["geneformer"]["repo_id"] == "ctheodoris/Geneformer"
    for name, folder in [
        ("geneformer_v1_10m", "Geneformer-V1-10M"),
        ("geneformer_v2_104m", "Geneformer-V2-104M"),
        ("geneformer_v2_316m", "Geneformer-V2-316M"),
    ]:
        assert models[name]["subfolder"] == folder
        assert models[name]["revision"] == models["geneformer"]["revision"]
        assert _registry.resolve(folder)["name"] == name  # folder names are understood too

    # The dictionaries are downloaded from the same pinned Geneformer commit, at their upstream paths.
    revision = models["geneformer"]["revision"]
    for name, upstream in GENEFORMER_DICTS.items():
        assert files[name]["url"] == f"https://huggingface.co/ctheodoris/Geneformer/resolve/{revision}/{upstream}"
        assert files[name]["licence"] == "Apache-2.0"

    groups = {n: e for n, e in reg.items() if e["kind"] == "group"}
    assert _registry.expand(["hg38"]) == [f"hg38_{c}" for c in HG38]
    assert set(_registry.expand(["default"])) >= {"enformer", "gencode_v44_basic_gtf", "hg38_chr8"}
    assert "default" in groups


def test_registry_is_package_data_and_a_copy():
    assert resources.files("sc_dta.datasets").joinpath("registry.yaml").is_file()
    reg = dta.datasets.registry()
    reg["hg38_chr1"]["url"] = "http://elsewhere.invalid/x"
    del reg["enformer"]
    fresh = dta.datasets.registry()
    assert fresh["hg38_chr1"]["url"].startswith("https://hgdownload.soe.ucsc.edu/")
    assert "enformer" in fresh


def test_registry_sha256_match_reference_data(geneformer_data):
    sums = {}
    for line in (geneformer_data / "SHA256SUMS").read_text().splitlines():
        digest, fname = line.split()
        sums[fname] = digest
    reg = dta.datasets.registry()
    for name, upstream in GENEFORMER_DICTS.items():
        fname = upstream.rsplit("/", 1)[-1]
        data = (geneformer_data / fname).read_bytes()
        assert reg[name]["sha256"] == sums[fname] == sha256(data), name
        assert reg[name]["size"] == len(data), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": None}, "sha256_reason"),
        ({"sha256": "abc"}, "64"),
        ({"licence": ""}, "licence"),
        ({"url": "not a url"}, "url"),
        ({"filename": "../escape.bin"}, "filename"),
        ({"size": -1}, "size"),
    ],
)
def test_registry_validation_rejects_bad_file_entries(change, message):
    good = {
        "url": "https://example.org/a.bin",
        "sha256": "0" * 64,
        "size": 1,
        "licence": "x",
        "citation": "x",
        "description": "x",
    }
    assert _registry._validate({"files": {"ok": good}})["ok"]["filename"] == "a.bin"
    with pytest.raises(ValueError, match=message) as err:
        _registry._validate({"files": {"bad_entry": {**good, **change}}})
    assert "bad_entry" in str(err.value)


def test_registry_validation_rejects_bad_models_and_groups():
    model = {"repo_id": "a/b", "revision": "f" * 40, "licence": "x", "citation": "x", "description": "x"}
    assert _registry._validate({"models": {"m": model}})["m"]["revision"] == "f" * 40
    with pytest.raises(ValueError, match="40-hex"):
        _registry._validate({"models": {"m": {**model, "revision": "main"}}})
    with pytest.raises(ValueError, match="revision_branch"):
        _registry._validate({"models": {"m": {**model, "revision": None}}})
    with pytest.raises(ValueError, match="unknown entries"):
        _registry._validate({"models": {"m": model}, "groups": {"g": ["m", "nope"]}})
    with pytest.raises(ValueError, match="contains itself"):
        _registry._validate({"groups": {"g": ["h"], "h": ["g"]}})


# --------------------------------------------------------------------------------------------------
# fetch (pooch)
# --------------------------------------------------------------------------------------------------


def test_fetch_right_hash_is_accepted_and_cached(server, monkeypatch):
    payload = b"ACGT" * 1000
    server.routes["/files/good.bin"] = payload
    add_file_entry(monkeypatch, "test_good", server.url + "/files/good.bin", sha=sha256(payload))

    path = dta.datasets.fetch("test_good")
    assert path == dta.settings.cache_dir / "data" / "test" / "test_good.bin"
    assert path.read_bytes() == payload
    assert server.requests == [("GET", "/files/good.bin")]
    # Nothing but the verified file is in the cache (no temporary files left over).
    assert files_under(dta.settings.cache_dir / "data") == [path]

    # Second call: served from the cache, even with the server gone.
    server.stop()
    assert dta.datasets.fetch("test_good") == path
    assert len(server.requests) == 1


def test_fetch_wrong_hash_is_refused_and_nothing_is_cached(server, monkeypatch):
    payload = b"tampered content"
    expected = sha256(b"the real content")
    server.routes["/files/bad.bin"] = payload
    add_file_entry(monkeypatch, "test_bad", server.url + "/files/bad.bin", sha=expected)

    with pytest.raises(ValueError) as err:
        dta.datasets.fetch("test_bad")
    message = str(err.value)
    assert "test_bad" in message and "test/test_bad.bin" in message
    assert expected in message and sha256(payload) in message
    assert files_under(dta.settings.cache_dir) == []
    assert len(server.requests) == 1 + _fetch._RETRIES  # retried, then refused


def test_fetch_replaces_a_corrupted_cached_file(server, monkeypatch):
    payload = b">chr1\nACGT\n"
    server.routes["/files/c.bin"] = payload
    add_file_entry(monkeypatch, "test_c", server.url + "/files/c.bin", sha=sha256(payload))
    target = dta.settings.cache_dir / "data" / "test" / "test_c.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert dta.datasets.fetch("test_c").read_bytes() == payload
    assert len(server.requests) == 1


def test_fetch_without_hash_and_custom_cache_dir(server, monkeypatch, tmp_path):
    server.routes["/x.gz"] = b"12345"
    add_file_entry(monkeypatch, "test_nohash", server.url + "/x.gz", sha=None, filename="sub/x.gz")
    path = dta.datasets.fetch("test_nohash", cache_dir=tmp_path / "mine", progress=True)
    assert path == tmp_path / "mine" / "sub" / "x.gz"
    assert path.read_bytes() == b"12345"


def test_unknown_name_raises_before_any_network_access(server):
    with pytest.raises(KeyError, match="hg38_chr2"):  # close names are suggested
        dta.datasets.fetch("hg38_chr23")
    with pytest.raises(KeyError, match="not a data file"):
        dta.datasets.fetch("enformer")
    with pytest.raises(KeyError, match="not_a_dataset"):
        dta.datasets.prefetch(["geneformer_v2_token_dictionary", "not_a_dataset"], base_url=server.url)
    assert server.requests == []
    assert files_under(dta.settings.cache_dir) == []


def test_mirror_base_url_from_environment(server, monkeypatch):
    payload = b"mirror copy"
    add_file_entry(monkeypatch, "test_m", "https://upstream.invalid/m.bin", sha=sha256(payload), filename="a/m.bin")
    server.routes["/mirror/a/m.bin"] = payload
    monkeypatch.setenv("SC_DTA_DATA_URL", server.url + "/mirror/")
    assert dta.datasets.fetch("test_m").read_bytes() == payload
    assert server.requests == [("GET", "/mirror/a/m.bin")]


@pytest.mark.parametrize("var", ["SC_DTA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_fetch_uses_the_cache_and_never_the_network(server, monkeypatch, var):
    payload = b"cached bytes"
    server.routes["/o.bin"] = payload
    add_file_entry(monkeypatch, "test_o", server.url + "/o.bin", sha=sha256(payload))
    monkeypatch.setenv(var, "1")
    with pytest.raises(FileNotFoundError) as err:
        dta.datasets.fetch("test_o")
    assert "prefetch" in str(err.value) and "test_o" in str(err.value) and var in str(err.value)
    assert server.requests == []

    monkeypatch.delenv(var)
    path = dta.datasets.fetch("test_o")
    monkeypatch.setenv(var, "1")
    assert dta.datasets.fetch("test_o") == path  # cached: fine offline
    assert len(server.requests) == 1


def test_connection_failure_is_a_clear_error(server, monkeypatch):
    add_file_entry(monkeypatch, "test_missing", server.url + "/nothing-here.bin", sha=sha256(b"x"))
    with pytest.raises(ConnectionError, match="test_missing"):
        dta.datasets.fetch("test_missing")
    assert files_under(dta.settings.cache_dir) == []


def test_real_geneformer_dictionaries_from_loopback(geneformer_data, server, caplog):
    # Serve the real files at their registry cache paths (a mirror), then prefetch both groups.
    for upstream in GENEFORMER_DICTS.values():
        server.routes["/" + upstream] = (geneformer_data / upstream.rsplit("/", 1)[-1]).read_bytes()
    caplog.set_level(logging.INFO, logger="sc_dta")
    paths = dta.datasets.prefetch(["geneformer_v2_dictionaries", "geneformer_v1_dictionaries"], base_url=server.url)
    assert "prefetch 8/8: geneformer_v1_gene_name_id_dict" in caplog.text
    assert set(paths) == set(GENEFORMER_DICTS)
    sums = dict(reversed(line.split()) for line in (geneformer_data / "SHA256SUMS").read_text().splitlines())
    for name, upstream in GENEFORMER_DICTS.items():
        fname = upstream.rsplit("/", 1)[-1]
        assert paths[name] == dta.settings.cache_dir / "data" / upstream
        assert sha256(paths[name].read_bytes()) == sums[fname]
    assert len(server.requests) == len(GENEFORMER_DICTS)

    # A tampered dictionary is refused against the registry's real sha256.
    server.routes["/" + GENEFORMER_DICTS["geneformer_v2_token_dictionary"]] = b"\x80\x04not the dictionary"
    with pytest.raises(ValueError, match=dta.datasets.registry()["geneformer_v2_token_dictionary"]["sha256"]):
        dta.datasets.fetch(
            "geneformer_v2_token_dictionary", cache_dir=dta.settings.cache_dir / "other", base_url=server.url
        )


# --------------------------------------------------------------------------------------------------
# hf_snapshot
# --------------------------------------------------------------------------------------------------


def test_hf_snapshot_local_directory_passes_through(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "my_model"
    model_dir.mkdir()
    assert dta.datasets.hf_snapshot(model_dir) == model_dir
    assert dta.datasets.hf_snapshot(str(model_dir), endpoint=server.url) == model_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dta.datasets.hf_snapshot(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dta.datasets.hf_snapshot("./missing_model_dir")
    assert server.requests == []


def test_hf_snapshot_offline_and_not_cached_is_a_clear_error(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        dta.datasets.hf_snapshot("enformer", cache_dir=tmp_path, endpoint=server.url)
    message = str(err.value)
    assert "prefetch" in message and "enformer" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(KeyError, match="enformer"):
        dta.datasets.hf_snapshot("enformr", cache_dir=tmp_path, endpoint=server.url)
    assert server.requests == []


def _fake_hf_cache(cache: Path, repo_id: str, revision: str, files: dict[str, bytes]) -> Path:
    """Lay out a Hugging Face hub cache by hand: models--owner--name/snapshots/<commit>/<files>."""
    snapshot = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision
    for rel, data in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).write_bytes(data)
    return snapshot


def test_hf_snapshot_offline_finds_pinned_cached_snapshots(tmp_path, monkeypatch, geneformer_data):
    reg = dta.datasets.registry()
    monkeypatch.setenv("SC_DTA_OFFLINE", "1")
    enformer = _fake_hf_cache(
        tmp_path, "EleutherAI/enformer-official-rough", reg["enformer"]["revision"], {"config.json": b"{}"}
    )
    assert dta.datasets.hf_snapshot("enformer", cache_dir=tmp_path) == enformer
    assert dta.datasets.hf_snapshot("EleutherAI/enformer-official-rough", cache_dir=tmp_path) == enformer

    config = (geneformer_data / "Geneformer-V1-10M_config.json").read_bytes()
    revision = reg["geneformer_v1_10m"]["revision"]
    root = _fake_hf_cache(tmp_path, "ctheodoris/Geneformer", revision, {"Geneformer-V1-10M/config.json": config})
    path = dta.datasets.hf_snapshot("Geneformer-V1-10M", cache_dir=tmp_path, verify=True)
    assert path == root / "Geneformer-V1-10M"
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 256

    # A snapshot whose file does not match the registry's sha256 is refused when verifying.
    (path / "config.json").write_bytes(config.replace(b"256", b"257"))
    with pytest.raises(ValueError, match="config.json"):
        dta.datasets.hf_snapshot("geneformer_v1_10m", cache_dir=tmp_path, verify=True)
    # The model folder of a snapshot that lacks it is a clear error.
    with pytest.raises(FileNotFoundError, match="Geneformer-V2-104M"):
        dta.datasets.hf_snapshot("geneformer_v2_104m", cache_dir=tmp_path)


def test_hf_snapshot_unpinned_repository_warns(tmp_path, monkeypatch, server):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="No revision is pinned"), pytest.raises(FileNotFoundError):
        dta.datasets.hf_snapshot("someone/some-model", cache_dir=tmp_path, endpoint=server.url)
    # An explicit revision does not warn.
    snapshot = _fake_hf_cache(tmp_path, "someone/some-model", "a" * 40, {"config.json": b"{}"})
    assert dta.datasets.hf_snapshot("someone/some-model@" + "a" * 40, cache_dir=tmp_path) == snapshot
    assert server.requests == []


def test_hf_snapshot_and_prefetch_download_from_a_loopback_hub(tmp_path, server, monkeypatch):
    """The real snapshot_download against a minimal Hub API served on the loopback interface."""
    reg = dta.datasets.registry()
    repo, commit = "EleutherAI/enformer-official-rough", reg["enformer"]["revision"]
    files = {"config.json": b'{"dim": 8}', "pytorch_model.bin": b"weights" * 100, "README.md": b"# card", "x.txt": b""}
    siblings = [{"rfilename": f} for f in files]
    server.routes[f"/api/models/{repo}/revision/{commit}"] = (
        json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode(),
        {"Content-Type": "application/json"},
    )
    for rel, data in files.items():
        server.routes[f"/{repo}/resolve/{commit}/{rel}"] = (
            data,
            {"X-Repo-Commit": commit, "ETag": f'"{sha256(data)}"'},
        )

    path = dta.datasets.hf_snapshot("enformer", cache_dir=tmp_path, endpoint=server.url)
    assert path.name == commit
    # Only the registry's allow_patterns were downloaded (x.txt is not one of them).
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "pytorch_model.bin"]
    assert (path / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"]
    assert ("GET", f"/api/models/{repo}/revision/{commit}") in server.requests

    # prefetch verifies model files against the registry: these stand-in weights are not the real ones.
    with pytest.raises(RuntimeError, match="pytorch_model.bin|config.json"):
        dta.datasets.prefetch("enformer", hf_cache_dir=tmp_path, endpoint=server.url)
    assert dta.datasets.prefetch("enformer", hf_cache_dir=tmp_path, endpoint=server.url, verify=False) == {
        "enformer": path
    }

    # Now cached: offline access works with the server gone.
    server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dta.datasets.hf_snapshot("enformer", cache_dir=tmp_path) == path


def test_registry_import_is_light():
    """Listing the registry must not pull in pooch, huggingface_hub or torch."""
    import subprocess
    import sys

    code = (
        "import sys, sc_dta as dta; dta.datasets.registry(); "
        "print(sorted(m for m in ('pooch', 'huggingface_hub', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

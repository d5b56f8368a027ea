"""Tests of dta.datasets.known_targets / targets_from_table: CollecTRI through the registry, all offline.

The network files are small CollecTRI-format files written by the tests and served by a loopback
HTTP server (127.0.0.1, random port) that stands in for Zenodo and OmniPath.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _loopback import LoopbackServer, online_environment

import sc_dta as dta
from sc_dta.datasets import _known_targets, _registry

# (source, target, weight, resources, references, sign_decision), as in Zenodo's CollecTRI_regulons.csv.
COLLECTRI_ROWS = [
    ("MYC", "TERT", 1, "CollecTRI_ExTRI;CollecTRI_HTRI", "CollecTRI:10022128;CollecTRI:10491298", "PMID"),
    ("GATA4", "NPPA", 1, "CollecTRI_ExTRI;CollecTRI_TRRUST", "CollecTRI:9584153", "PMID"),
    ("GATA4", "NPPB", 1, "CollecTRI_ExTRI", "CollecTRI:10329667", "PMID"),
    ("GATA4", "MYH6", 1, "CollecTRI_ExTRI;CollecTRI_NTNU.Curated", "CollecTRI:7760831", "PMID"),
    ("GATA4", "CYP17A1", -1, "CollecTRI_ExTRI", "CollecTRI:17360482", "PMID"),
    ("TBX5", "NPPA", 1, "CollecTRI_ExTRI;CollecTRI_TRRUST", "CollecTRI:11124122", "PMID"),
    ("TBX5", "GJA5", 1, "CollecTRI_ExTRI", "CollecTRI:11567035", "default activation"),
    ("TBX5", "MYL2", -1, "CollecTRI_ExTRI", "CollecTRI:15950948", "PMID"),
    ("GATA6", "NPPA", 1, "CollecTRI_ExTRI", "CollecTRI:11279123", "default activation"),
    ("GATA5", "NPPA", 1, "CollecTRI_ExTRI", "CollecTRI:12482967", "default activation"),
    ("AP1", "JUN", 1, "CollecTRI_ExTRI;CollecTRI_TRRUST;CollecTRI_NTNU.Curated", "CollecTRI:10022869", "PMID"),
    ("AP1", "MMP1", 1, "CollecTRI_ExTRI", "CollecTRI:10037172", "PMID"),
    ("NFKB", "NFKBIA", 1, "CollecTRI_ExTRI;CollecTRI_TRRUST", "CollecTRI:10064620", "PMID"),
    ("MYC", "CDKN1A", -1, "CollecTRI_ExTRI;CollecTRI_TRRUST", "CollecTRI:11252954", "PMID"),
]
HEADER = ("source", "target", "weight", "resources", "references", "sign_decision")
FILENAME = "collectri/zenodo-8192729/CollecTRI_regulons.csv"
ZENODO_PATH = "/records/8192729/files/CollecTRI_regulons.csv"


def collectri_bytes(rows=COLLECTRI_ROWS, header=HEADER, sep=",") -> bytes:
    lines = [sep.join(header)] + [sep.join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected(tf=None, sign="any"):
    """(source, target, weight) rows the loader must return, computed straight from COLLECTRI_ROWS."""
    tfs = [tf] if isinstance(tf, str) else tf
    rows = [(s, t, float(w)) for s, t, w, *_ in COLLECTRI_ROWS]
    if tfs is not None:
        rows = [r for name in tfs for r in rows if r[0].casefold() == name.casefold()]
    if sign != "any":
        rows = [r for r in rows if (r[2] > 0) == (sign == "activating")]
    return rows


def triples(frame: pd.DataFrame) -> list[tuple[str, str, float]]:
    return list(zip(frame["source"], frame["target"], frame["weight"], strict=True))


# --------------------------------------------------------------------------------------------------
# Loopback server and registry overrides
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    online_environment(monkeypatch)


def override_entry(monkeypatch, name: str, url: str, sha: str | None) -> dict:
    """Point the registry entry ``name`` at ``url`` with hash ``sha`` for one test (filename unchanged)."""
    entry = {**_registry._entries()[name], "url": url, "sha256": sha}
    if sha is None:
        entry["sha256_reason"] = "test"
        entry.pop("md5", None)
    monkeypatch.setitem(_registry._entries(), name, entry)
    return entry


@pytest.fixture
def zenodo(server, monkeypatch):
    """The human CollecTRI entry served by the loopback server with the test file's real sha256."""
    data = collectri_bytes()
    server.routes[ZENODO_PATH] = data
    override_entry(monkeypatch, "collectri_human", server.url + ZENODO_PATH + "?download=1", sha256(data))
    return server


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_entries_for_collectri():
    reg = dta.datasets.registry()
    human, mouse = reg["collectri_human"], reg["collectri_mouse"]
    assert human["url"] == "https://zenodo.org/records/8192729/files/CollecTRI_regulons.csv?download=1"
    assert human["filename"] == FILENAME
    assert human["sha256"] == "4473c9189dd53dacc80297709ad1452dda1086a1cc2185f9a56146c261668701"
    assert human["size"] == 4345649 and not human.get("size_approximate", False)
    assert "gkad841" in human["citation"] and "CC-BY-4.0" in human["licence"]
    assert mouse["url"].startswith("https://omnipathdb.org/interactions?datasets=collectri&organisms=10090")
    assert mouse["sha256"] is None and "OmniPath" in mouse["sha256_reason"]
    assert mouse["filename"] != human["filename"]
    for by_organism in _known_targets.SOURCES.values():
        for name in by_organism.values():
            assert reg[name]["kind"] == "file"


def test_lazy_exports():
    from sc_dta import datasets

    assert datasets.known_targets is _known_targets.known_targets
    assert datasets.targets_from_table is _known_targets.targets_from_table
    assert {"known_targets", "targets_from_table", "sergio_grn"} <= set(dir(datasets))


# --------------------------------------------------------------------------------------------------
# known_targets through the registry
# --------------------------------------------------------------------------------------------------


def test_whole_network_is_parsed_from_the_download(zenodo):
    net = dta.datasets.known_targets()
    assert list(net.columns) == ["source", "target", "weight", "resources", "references"]
    assert triples(net) == expected()
    assert net["weight"].dtype == float and set(net["weight"]) == {1.0, -1.0}
    assert net.index.tolist() == list(range(len(COLLECTRI_ROWS)))
    assert net.loc[0, "references"] == "CollecTRI:10022128;CollecTRI:10491298"
    assert net.loc[0, "resources"] == "CollecTRI_ExTRI;CollecTRI_HTRI"
    assert zenodo.paths == [ZENODO_PATH + "?download=1"]
    cached = dta.settings.cache_dir / "data" / FILENAME
    assert cached.read_bytes() == collectri_bytes()


def test_tf_filter_is_case_insensitive_and_keeps_file_spelling(zenodo):
    gata4 = dta.datasets.known_targets("gata4")
    assert triples(gata4) == expected("GATA4")
    assert set(gata4["source"]) == {"GATA4"}
    assert gata4.index.tolist() == list(range(4))
    # Several TFs: grouped in the order asked, duplicates (also by case) asked once.
    both = dta.datasets.known_targets(["TBX5", "GATA4", "tbx5"])
    assert triples(both) == expected(["TBX5", "GATA4"])
    # A tuple works as well as a list.
    assert triples(dta.datasets.known_targets(("GATA4",))) == expected("GATA4")


def test_sign_filter(zenodo):
    assert triples(dta.datasets.known_targets("GATA4", sign="activating")) == expected("GATA4", "activating")
    assert triples(dta.datasets.known_targets("GATA4", sign="repressing")) == [("GATA4", "CYP17A1", -1.0)]
    repressed = dta.datasets.known_targets(sign="repressing")
    assert triples(repressed) == expected(sign="repressing")
    # A TF of the network without targets of that sign: no rows, same columns (not an error).
    none = dta.datasets.known_targets("AP1", sign="repressing")
    assert none.empty and list(none.columns) == list(repressed.columns)
    with pytest.raises(ValueError, match="'activating'"):
        dta.datasets.known_targets("GATA4", sign="up")


def test_complexes_are_kept_as_in_the_file(zenodo):
    assert triples(dta.datasets.known_targets("AP1")) == [("AP1", "JUN", 1.0), ("AP1", "MMP1", 1.0)]
    assert triples(dta.datasets.known_targets("nfkb")) == [("NFKB", "NFKBIA", 1.0)]
    # JUN is a target here, not a regulator: asking for it is an error, not the AP1 complex.
    with pytest.raises(KeyError, match="'JUN'"):
        dta.datasets.known_targets("JUN")


def test_unknown_tf_names_it_and_close_names(zenodo):
    with pytest.raises(KeyError) as err:
        dta.datasets.known_targets("GATA44")
    message = str(err.value)
    assert "'GATA44'" in message and "'GATA4'" in message and "'GATA5'" in message
    assert f"{len({r[0] for r in COLLECTRI_ROWS})} regulators" in message and "CollecTRI" in message

    with pytest.raises(KeyError) as err:
        dta.datasets.known_targets(["GATA4", "TBX55", "ZZZ9"])
    message = str(err.value)
    assert "'TBX55' (close names: 'TBX5')" in message and "'ZZZ9' (no close names)" in message
    assert "GATA4" not in message  # only the missing names are reported


def test_bad_arguments_fail_before_any_download(server):
    with pytest.raises(ValueError, match="source='dorothea'.*'collectri'"):
        dta.datasets.known_targets("GATA4", source="dorothea")
    with pytest.raises(ValueError, match="organism='zebrafish'.*'human', 'mouse'"):
        dta.datasets.known_targets("GATA4", organism="zebrafish")
    with pytest.raises(ValueError, match="tf must be"):
        dta.datasets.known_targets([])
    with pytest.raises(ValueError, match="tf must be"):
        dta.datasets.known_targets(["GATA4", 5])
    assert server.requests == []
    assert not (dta.settings.cache_dir / "data").exists()


def test_organism_aliases_select_the_entry():
    assert _known_targets._registry_name("collectri", "Homo sapiens") == "collectri_human"
    assert _known_targets._registry_name("CollecTRI", 9606) == "collectri_human"
    assert _known_targets._registry_name("collectri", "mus musculus") == "collectri_mouse"
    assert _known_targets._registry_name("collectri", 10090) == "collectri_mouse"


def test_cached_file_is_reused_without_a_request(zenodo):
    first = dta.datasets.known_targets("GATA4")
    first.loc[0, "target"] = "CHANGED"  # callers get their own copy
    zenodo.stop()
    second = dta.datasets.known_targets("GATA4")
    assert triples(second) == expected("GATA4")
    assert len(zenodo.paths) == 1


def test_wrong_hash_is_refused_and_nothing_is_cached(server, monkeypatch):
    server.routes[ZENODO_PATH] = collectri_bytes()
    override_entry(monkeypatch, "collectri_human", server.url + ZENODO_PATH, sha256(b"the published file"))
    with pytest.raises(ValueError, match="Checksum mismatch for 'collectri_human'"):
        dta.datasets.known_targets("GATA4")
    data_dir = dta.settings.cache_dir / "data"
    assert not data_dir.exists() or not any(p.is_file() for p in data_dir.rglob("*"))


@pytest.mark.parametrize("var", ["SC_DTA_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode(zenodo, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(FileNotFoundError) as err:
        dta.datasets.known_targets("GATA4")
    message = str(err.value)
    assert "collectri_human" in message and "prefetch" in message and "path=" in message and var in message
    assert zenodo.paths == []

    monkeypatch.delenv(var)
    dta.datasets.prefetch("collectri_human")
    assert len(zenodo.paths) == 1
    monkeypatch.setenv(var, "1")
    zenodo.stop()
    assert triples(dta.datasets.known_targets("TBX5")) == expected("TBX5")


def test_mirror_from_environment(server, monkeypatch):
    data = collectri_bytes()
    override_entry(monkeypatch, "collectri_human", "https://zenodo.invalid/CollecTRI_regulons.csv", sha256(data))
    server.routes["/mirror/" + FILENAME] = data
    monkeypatch.setenv("SC_DTA_DATA_URL", server.url + "/mirror")
    assert triples(dta.datasets.known_targets("GATA4")) == expected("GATA4")
    assert server.paths == ["/mirror/" + FILENAME]


# --------------------------------------------------------------------------------------------------
# Local files (path=) and file formats
# --------------------------------------------------------------------------------------------------


def test_path_reads_local_csv_and_gzipped_tsv_without_network(tmp_path, server, monkeypatch):
    monkeypatch.setenv("SC_DTA_OFFLINE", "1")
    plain = tmp_path / "collectri.csv"
    plain.write_bytes(collectri_bytes())
    assert triples(dta.datasets.known_targets("GATA4", path=plain)) == expected("GATA4")

    tsv_gz = tmp_path / "collectri.tsv.gz"
    tsv_gz.write_bytes(gzip.compress(collectri_bytes(sep="\t")))
    assert triples(dta.datasets.known_targets(path=tsv_gz)) == expected()

    # Gzip is recognised by content, not by the file name.
    hidden = tmp_path / "network.txt"
    hidden.write_bytes(gzip.compress(collectri_bytes()))
    assert triples(dta.datasets.known_targets(["TBX5"], path=str(hidden))) == expected("TBX5")

    # Only source/target/weight, as a decoupler table saved by a user.
    short = tmp_path / "decoupler.csv"
    pd.DataFrame(expected(), columns=["source", "target", "weight"]).to_csv(short, index=False)
    net = dta.datasets.known_targets("GATA4", path=short)
    assert list(net.columns) == ["source", "target", "weight"] and triples(net) == expected("GATA4")

    assert server.requests == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dta.datasets.known_targets(path=tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        dta.datasets.known_targets(path=tmp_path)


OMNIPATH_HEADER = (
    "source",
    "target",
    "source_genesymbol",
    "target_genesymbol",
    "is_directed",
    "is_stimulation",
    "is_inhibition",
    "consensus_direction",
    "consensus_stimulation",
    "consensus_inhibition",
    "references",
)
OMNIPATH_ROWS = [
    # stimulation only -> +1
    ("Q08369", "P05125", "Gata4", "Nppa", 1, 1, 0, 1, 1, 0, "CollecTRI:9584153"),
    # inhibition only -> -1
    ("Q08369", "P27786", "Gata4", "Cyp17a1", 1, 0, 1, 1, 0, 1, "CollecTRI:17360482"),
    # both flags, consensus says stimulation -> +1
    ("P70326", "Q01815", "Tbx5", "Gja5", 1, 1, 1, 1, 1, 0, "CollecTRI:11567035"),
    # both flags, consensus undecided -> -1 (inhibition wins, as in decoupler)
    ("P70326", "P51667", "Tbx5", "Myl2", 1, 1, 1, 1, 1, 1, "CollecTRI:15950948"),
    # no flag at all -> +1
    ("Q08369", "P13431", "Gata4", "Nppb", 1, 0, 0, 1, 0, 0, "CollecTRI:10329667"),
    # a complex, kept under its OmniPath name
    ("COMPLEX:P05627_P01101", "P03956", "Jun_Fos", "Mmp1a", 1, 1, 0, 1, 1, 0, "CollecTRI:10037172"),
    # the same interaction twice (once per resource): one row
    ("Q08369", "P05125", "Gata4", "Nppa", 1, 1, 0, 1, 1, 0, "CollecTRI:9584153"),
]


def test_omnipath_mouse_table(server, monkeypatch):
    data = collectri_bytes(OMNIPATH_ROWS, OMNIPATH_HEADER, sep="\t")
    server.routes["/interactions"] = data
    query = "/interactions?datasets=collectri&organisms=10090&genesymbols=yes"
    override_entry(monkeypatch, "collectri_mouse", server.url + query, None)

    net = dta.datasets.known_targets(organism="mouse")
    assert triples(net) == [
        ("Gata4", "Nppa", 1.0),
        ("Gata4", "Cyp17a1", -1.0),
        ("Tbx5", "Gja5", 1.0),
        ("Tbx5", "Myl2", -1.0),
        ("Gata4", "Nppb", 1.0),
        ("Jun_Fos", "Mmp1a", 1.0),
    ]
    assert list(net.columns) == ["source", "target", "weight", "references"]
    assert server.paths == [query]
    # Human-style capitals find the mouse symbols.
    assert triples(dta.datasets.known_targets("GATA4", organism="mouse", sign="repressing")) == [
        ("Gata4", "Cyp17a1", -1.0)
    ]
    assert dta.datasets.known_targets("jun_fos", organism="mouse")["target"].tolist() == ["Mmp1a"]
    assert (dta.settings.cache_dir / "data" / "collectri/omnipath/collectri_mouse_10090.tsv").read_bytes() == data


def test_duplicates_conflicts_and_symbols_that_look_missing(tmp_path):
    rows = [
        ("GATA4", "NPPA", 1),
        ("GATA4", "NPPA", 1),  # exact duplicate
        ("GATA4", "MYH7", 1),
        ("GATA4", "MYH7", -1),  # listed with both signs: the repressing row stays
        ("GATA4", "NA", 1),  # a symbol, not a missing value
        ("GATA4", "", 1),  # no target: dropped
        ("TBX5", "NPPA", 2.5),  # weights of other scales keep their sign
        ("TBX5", "MYL2", -0.5),
    ]
    path = tmp_path / "net.csv"
    path.write_bytes(collectri_bytes(rows, ("source", "target", "weight")))
    net = dta.datasets.known_targets(path=path)
    assert triples(net) == [
        ("GATA4", "NPPA", 1.0),
        ("GATA4", "MYH7", -1.0),
        ("GATA4", "NA", 1.0),
        ("TBX5", "NPPA", 1.0),
        ("TBX5", "MYL2", -1.0),
    ]


def test_unusable_files_are_clear_errors(tmp_path):
    zero = tmp_path / "zero.csv"
    zero.write_bytes(collectri_bytes([("GATA4", "NPPA", 1), ("GATA4", "NPPB", 0)], ("source", "target", "weight")))
    with pytest.raises(ValueError, match="'weight' has 1 missing, zero or non-numeric"):
        dta.datasets.known_targets(path=zero)

    unsigned = tmp_path / "unsigned.csv"
    unsigned.write_bytes(collectri_bytes([("GATA4", "NPPA")], ("source", "target")))
    with pytest.raises(ValueError, match="no sign column.*targets_from_table"):
        dta.datasets.known_targets(path=unsigned)

    wrong = tmp_path / "wrong.tsv"
    wrong.write_bytes(collectri_bytes([("GATA4", "NPPA", 1)], ("regulator_id", "gene_id", "weight"), sep="\t"))
    with pytest.raises(ValueError, match="no target column.*columns found: 'regulator_id', 'gene_id', 'weight'"):
        dta.datasets.known_targets(path=wrong)

    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        dta.datasets.known_targets(path=empty)


# --------------------------------------------------------------------------------------------------
# targets_from_table
# --------------------------------------------------------------------------------------------------


def test_targets_from_a_decoupler_table():
    # The form decoupler returns (dc.op.collectri): source, target, weight and evidence columns.
    table = pd.DataFrame(
        [(s, t, w, res, ref) for s, t, w, res, ref, _ in COLLECTRI_ROWS],
        columns=["source", "target", "weight", "resources", "references"],
    )
    assert dta.datasets.targets_from_table(table, "GATA4") == ["NPPA", "NPPB", "MYH6", "CYP17A1"]
    assert dta.datasets.targets_from_table(table, "gata4", sign="activating") == ["NPPA", "NPPB", "MYH6"]
    assert dta.datasets.targets_from_table(table, "TBX5", sign="repressing") == ["MYL2"]
    # Several TFs: the union, each gene once, in order of first appearance.
    assert dta.datasets.targets_from_table(table, ["GATA4", "TBX5"]) == [
        "NPPA",
        "NPPB",
        "MYH6",
        "CYP17A1",
        "GJA5",
        "MYL2",
    ]
    with pytest.raises(KeyError, match="'GATA44' \\(close names: 'GATA4'"):
        dta.datasets.targets_from_table(table, "GATA44")
    with pytest.raises(ValueError, match="holds 7 TFs.*pass tf="):
        dta.datasets.targets_from_table(table)
    # The input is not changed.
    assert len(table) == len(COLLECTRI_ROWS) and list(table.columns)[0] == "source"


def test_targets_from_other_table_forms(tmp_path, zenodo):
    # known_targets output for one TF: tf may be left out.
    assert dta.datasets.targets_from_table(dta.datasets.known_targets("TBX5")) == ["NPPA", "GJA5", "MYL2"]
    # Other column names, matched case-insensitively; no sign column.
    table = pd.DataFrame({"TF": ["GATA4", "GATA4", "TBX5"], "Gene": ["NPPA", "TNNT2", "GJA5"]})
    assert dta.datasets.targets_from_table(table, "GATA4") == ["NPPA", "TNNT2"]
    with pytest.raises(ValueError, match="no sign column"):
        dta.datasets.targets_from_table(table, "GATA4", sign="activating")
    # A plain list of targets in a table.
    assert dta.datasets.targets_from_table(pd.DataFrame({"target": ["A", "B", "A"]})) == ["A", "B"]
    with pytest.raises(ValueError, match="no TF column"):
        dta.datasets.targets_from_table(pd.DataFrame({"target": ["A"]}), "GATA4")
    # A file (OmniPath form, gzip).
    path = tmp_path / "omnipath.tsv.gz"
    path.write_bytes(gzip.compress(collectri_bytes(OMNIPATH_ROWS, OMNIPATH_HEADER, sep="\t")))
    assert dta.datasets.targets_from_table(path, "Gata4") == ["Nppa", "Cyp17a1", "Nppb"]
    assert dta.datasets.targets_from_table(str(path), "Gata4", sign="repressing") == ["Cyp17a1"]
    with pytest.raises(TypeError, match="DataFrame or a file path"):
        dta.datasets.targets_from_table({"GATA4": ["NPPA"]}, "GATA4")
    with pytest.raises(ValueError, match="no target column"):
        dta.datasets.targets_from_table(pd.DataFrame({"source": ["GATA4"]}), "GATA4")


# --------------------------------------------------------------------------------------------------
# The real download (skipped by default; run with -m internet)
# --------------------------------------------------------------------------------------------------


@pytest.mark.internet
def test_real_collectri_download():
    net = dta.datasets.known_targets()
    assert len(net) > 40_000 and net["source"].nunique() > 1_000
    assert set(net["weight"]) == {1.0, -1.0}
    assert {"AP1", "NFKB", "GATA4", "TBX5"} <= set(net["source"])
    assert "NPPA" in dta.datasets.targets_from_table(net, "GATA4")

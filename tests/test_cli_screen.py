"""`sc-dta screen`: the CLI equals tl.screen, 2 torchrun (gloo) processes equal one, and bad input fails cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

import test_perturb  # noqa: E402
from test_cli import _help_entries, _one_line_error  # noqa: E402

import sc_dta as dta  # noqa: E402
from sc_dta.cli import main  # noqa: E402

tss_setup = test_perturb.tss_setup  # the BioDTA + genome fixture of the perturb tests

pytestmark = pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")

GENE = "ENSG00000000419"  # DPM1, chr1 + strand, TSS 1500 (0-based), absent from the first 4 cells


@pytest.fixture(scope="module")
def files(tss_setup, tmp_path_factory):
    """Input h5ad, saved model, FASTA, a mixed perturbation table and a VCF, as the CLI reads them."""
    a, vocab, model, encoder, genome, expected = tss_setup
    d = tmp_path_factory.mktemp("cli_screen")
    a = a.copy()
    a.obs["group"] = pd.Categorical(np.where(np.arange(a.n_obs) % 3 == 0, "A", "B"))
    a.obs["batch"] = np.where(np.arange(a.n_obs) < 12, "b1", "b2")
    h5ad = d / "cells.h5ad"
    a.write_h5ad(h5ad)
    model_dir = d / "model"
    model.save_pretrained(model_dir)
    snvs = dta.genome.saturation(genome, "chr1", 1500, "+", 4, 5)
    other = str(a.var_names[1])
    rows = [
        (GENE, "delete"),
        ("DPM1", "overexpress"),
        (other, "delete"),
        ("DPM1", "delete:-20:+20"),
        (GENE, str(snvs[0])),
        (GENE, [str(snvs[0]), str(snvs[5])]),
    ]
    table = d / "perturbations.csv"
    text = "# gene,perturbation table\ngene,perturbation\n"
    text += "".join(f"{g},{';'.join(p) if isinstance(p, list) else p}\n" for g, p in rows)
    table.write_text(text)
    vcf = d / "variants.vcf"
    vcf.write_text(
        "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
        + "".join(f"{v.chrom}\t{v.pos}\t.\t{v.ref}\t{v.alt}\t.\tPASS\t.\n" for v in snvs[:3])
    )
    fasta = genome.paths[0]
    return {
        "d": d,
        "adata": a,
        "h5ad": h5ad,
        "model": model_dir,
        "fasta": fasta,
        "table": table,
        "rows": rows,
        "vcf": vcf,
        "snvs": snvs,
        "encoder": ["--encoder", "kmer", "--k", str(encoder.k), "--window", str(encoder.window)],
    }


def _api(files, perturbations, **kw):
    from sc_dta.genome import Genome
    from sc_dta.models import BioDTA, KmerEncoder

    model = BioDTA.from_pretrained(files["model"], device="cpu")
    return dta.tl.screen(
        ad.read_h5ad(files["h5ad"]),
        perturbations,
        model=model,
        genome=Genome(files["fasta"]),
        encoder=KmerEncoder(k=3, window=200),
        device="cpu",
        **kw,
    )


def _assert_same(got: ad.AnnData, want: ad.AnnData, atol: float = 0.0) -> None:
    assert list(got.obs_names) == list(want.obs_names) and list(got.var_names) == list(want.var_names)
    pd.testing.assert_frame_equal(got.obs.astype(str), want.obs.astype(str))  # h5ad makes strings categorical
    np.testing.assert_allclose(got.X, want.X, atol=atol, rtol=0, equal_nan=True)
    assert set(got.layers) == set(want.layers)
    for key in want.layers:
        np.testing.assert_allclose(got.layers[key], want.layers[key], atol=atol, rtol=0, equal_nan=True)
    assert set(got.obsm) == set(want.obsm)
    for key in want.obsm:
        np.testing.assert_allclose(
            np.asarray(got.obsm[key]), np.asarray(want.obsm[key]), atol=atol, rtol=0, equal_nan=True
        )
    if "per_cell" in want.uns:
        for name in want.obs_names:
            np.testing.assert_allclose(
                got.uns["per_cell"]["shift"][name].toarray(),
                want.uns["per_cell"]["shift"][name].toarray(),
                atol=atol,
                rtol=0,
            )


def _screen_args(files, out, *extra):
    return [
        "screen",
        str(files["h5ad"]),
        "--model",
        str(files["model"]),
        "--genome",
        str(files["fasta"]),
        *files["encoder"],
        "-o",
        str(out),
        "-q",
        *extra,
    ]


def test_cli_screen_equals_python_api(files, capsys):
    """A table of deletions, overexpression and TSS mutations (one a ';'-joined haplotype), groups, per cell."""
    out = files["d"] / "table.h5ad"
    extra = ["--perturbations", str(files["table"]), "--readout", "cosine", "--groupby", "group", "--per-cell"]
    assert main([*_screen_args(files, out, *extra), "--cells", "batch=b1", "--chunk-size", "4"]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    got = ad.read_h5ad(out)
    a = files["adata"]
    want = _api(
        files,
        files["rows"],
        readout="cosine",
        groupby="group",
        per_cell=True,
        cells=(a.obs["batch"] == "b1").to_numpy(),
        chunk_size=4,
    )
    _assert_same(got, want)
    assert got.shape == (len(files["rows"]), a.n_vars)
    assert list(got.obs["kind"]) == ["delete", "overexpress", "delete"] + ["tss_mutation"] * 3
    assert got.obs["perturbation"].iloc[5] == f"{files['snvs'][0]};{files['snvs'][5]}"
    assert {"mean_A", "mean_B"} <= set(got.layers)
    assert np.isfinite(got.X).sum() > 10 and np.nanmax(np.abs(got.X)) > 1e-5
    # --cells: no cell outside batch b1 was evaluated
    outside = (a.obs["batch"] != "b1").to_numpy()
    assert np.isnan(got.obsm["cell_shift"].to_numpy()[:, outside]).all()
    assert (got.obs["n_cells"] <= 12).all()


def test_cli_screen_vcf_and_expression_readout(files):
    """A VCF's records become rows of the genes whose TSS window holds them (needs --genome); default readout."""
    from sc_dta.genome import read_vcf

    out = files["d"] / "vcf.h5ad"
    assert main([*_screen_args(files, out), "--perturbations", str(files["vcf"])]) == 0
    got = ad.read_h5ad(out)
    want = _api(files, read_vcf(files["vcf"]))
    _assert_same(got, want)
    assert GENE in set(got.obs["gene"]) and set(got.obs["kind"]) == {"tss_mutation"}
    assert got.uns["screen"]["params"]["readout"] == "expression"
    # a VCF is recognised by its first line whatever its name
    renamed = files["d"] / "variants.txt"
    renamed.write_text(files["vcf"].read_text())
    assert main([*_screen_args(files, files["d"] / "txt.h5ad"), "--perturbations", str(renamed)]) == 0
    _assert_same(ad.read_h5ad(files["d"] / "txt.h5ad"), want)


def test_cli_screen_gene_column_and_no_genome(files, tmp_path):
    """Token perturbations need no --genome; --gene-column / --perturbation-column rename the columns (TSV)."""
    table = tmp_path / "p.tsv"
    table.write_text(f"symbol\twhat\tnote\nDPM1\tdelete\tx\n{files['adata'].var_names[2]}\toverexpress\ty\n")
    out = tmp_path / "r.h5ad"
    args = ["screen", str(files["h5ad"]), "--model", str(files["model"]), "--perturbations", str(table)]
    assert main([*args, "--gene-column", "symbol", "--perturbation-column", "what", "-o", str(out), "-q"]) == 0
    want = _api(files, [("DPM1", "delete"), (str(files["adata"].var_names[2]), "overexpress")])
    _assert_same(ad.read_h5ad(out), want)


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run_torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SC_DTA_DEVICE": "cpu"}
    return subprocess.run(
        [*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "sc_dta", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=cwd,
    )


def test_torchrun_two_processes_equal_one(files, tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m sc_dta screen`: gloo, cells sharded, rank 0 writes once."""
    extra = ["--perturbations", str(files["table"]), "--readout", "cosine", "--groupby", "group", "--per-cell"]
    one = tmp_path / "one.h5ad"
    assert main([*_screen_args(files, one, *extra), "--chunk-size", "4"]) == 0
    two = tmp_path / "two.h5ad"
    ckpt = tmp_path / "ckpt"
    args = [*_screen_args(files, two, *extra), "--chunk-size", "4", "--checkpoint-dir", str(ckpt), "-v"]
    res = _run_torchrun(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(f"wrote {two}") == 1  # rank 0 alone writes and reports
    assert "gloo, 2 processes, rank 0" in res.stderr and "rank 1 on" not in res.stderr  # rank 0 alone logs
    assert "screen: process 0 of 2 evaluates" in res.stderr  # the cells were sharded
    _assert_same(ad.read_h5ad(two), ad.read_h5ad(one), atol=2e-5)  # float32 rounding of other batches
    assert len(list(ckpt.glob("perturbation_*.npz"))) == len(files["rows"])
    assert not list(tmp_path.glob(".two.h5ad.*"))  # no temporary file left


def test_torchrun_error_is_one_line_per_process(files, tmp_path):
    """An unknown gene fails inside the screen on both ranks: one line each, the group is torn down, no hang."""
    table = tmp_path / "bad.csv"
    table.write_text("gene,perturbation\nNOPE,delete\n")
    res = _run_torchrun([*_screen_args(files, tmp_path / "x.h5ad"), "--perturbations", str(table)], tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("sc-dta screen")]
    assert len(lines) == 2, res.stderr[-3000:]
    assert {line.split(": error: ", 1)[0] for line in lines} == {"sc-dta screen", "sc-dta screen (rank 1)"}
    assert all("NOPE" in line for line in lines)
    assert not (tmp_path / "x.h5ad").exists()


def test_bad_input_is_a_clean_error(files, tmp_path, capsys):
    base = ["screen", str(files["h5ad"]), "--model", str(files["model"]), "-o", str(tmp_path / "r.h5ad")]

    assert main([*base, "--perturbations", str(tmp_path / "missing.csv")]) == 2
    assert "perturbations file" in (line := _one_line_error(capsys, "screen")) and "does not exist" in line

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("symbol,perturbation\nDPM1,delete\n")
    assert main([*base, "--perturbations", str(wrong)]) == 2
    line = _one_line_error(capsys, "screen")
    assert "no column 'gene'" in line and "symbol, perturbation" in line and "--gene-column" in line
    assert main([*base, "--perturbations", str(wrong), "--gene-column", "name"]) == 2
    assert "no column 'name'" in _one_line_error(capsys, "screen")

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("gene,perturbation\nNOPE,delete\n")
    assert main([*base, "--perturbations", str(unknown)]) == 2
    assert "NOPE" in _one_line_error(capsys, "screen")

    bad_kind = tmp_path / "kind.csv"
    bad_kind.write_text("gene,perturbation\nDPM1,knockout\n")
    assert main([*base, "--perturbations", str(bad_kind)]) == 2
    assert "knockout" in _one_line_error(capsys, "screen")

    empty = tmp_path / "empty.csv"
    empty.write_text("gene,perturbation\nDPM1,\n")
    assert main([*base, "--perturbations", str(empty)]) == 2
    assert "row 1 has an empty gene or perturbation" in _one_line_error(capsys, "screen")

    # a TSS mutation or VCF without --genome: refused before the model is loaded
    assert main([*base, "--perturbations", str(files["table"])]) == 2
    assert "'delete:-20:+20' of 'DPM1' needs --genome" in _one_line_error(capsys, "screen")
    assert main([*base, "--perturbations", str(files["vcf"])]) == 2
    assert "VCF record chr1:" in (line := _one_line_error(capsys, "screen")) and "--genome" in line
    assert main([*base, "--perturbations", str(files["table"]), "--sample", "S1"]) == 2
    assert "--sample 'S1' is for a VCF file" in _one_line_error(capsys, "screen")

    # the output is checked before any work; -o is required (the input is never overwritten)
    ok = ["--perturbations", str(unknown)]
    assert main([*base[:-1], str(tmp_path / "r.csv"), *ok]) == 2
    assert "must end in .h5ad" in _one_line_error(capsys, "screen")
    assert main(["screen", str(files["h5ad"]), "--model", str(files["model"]), *ok]) == 2
    assert "--output" in capsys.readouterr().err
    assert not (tmp_path / "r.h5ad").exists()


def test_world_size_one_runs_without_a_group(monkeypatch):
    """WORLD_SIZE=1 (torchrun --nproc-per-node 1) or unset: no process group is made; bad torchrun env refused."""
    import torch.distributed as dist

    from sc_dta.cli import CLIError, _process_group

    monkeypatch.setenv("WORLD_SIZE", "1")
    with _process_group("cpu") as proc:
        assert (proc.size, proc.rank, proc.main, proc.device) == (1, 0, True, "cpu")
        assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(CLIError, match="RANK is not set"), _process_group("cpu"):
        pass
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CLIError, match="RANK='x' is not an integer"), _process_group("cpu"):
        pass


def test_help_states_each_default_once(capsys):
    assert main(["screen", "--help"]) == 0
    entries = _help_entries(capsys.readouterr().out)
    assert any(e.startswith("--perturbations") for e in entries)
    for entry in entries:
        assert entry.lower().count("default") <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    assert next(e for e in entries if e.startswith("--chunk-size")).endswith("(default: 32)")


def test_python_m_screen_help():
    res = subprocess.run(
        [sys.executable, "-m", "sc_dta", "screen", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "usage: sc-dta screen" in res.stdout and "--perturbations" in res.stdout

from __future__ import annotations

import subprocess
import sys
from itertools import product
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sc_dta as dta
from sc_dta.cli import build_parser, main

sys.path.insert(0, str(Path(__file__).parent))
from _sim_files import canonical_tss as _canonical_tss
from _sim_files import read_fasta as _read_fasta
from _sim_files import revcomp as _revcomp

SUBCOMMANDS = [
    "demo",
    "annotate-tss",
    "embed-dna",
    "train",
    "perturb-tss",
    "perturb-gene",
    "screen",
    "rank",
    "plot",
    "prefetch",
]


def _kmer_spectrum(seq: str, k: int = 4) -> np.ndarray:
    """Independent k-mer spectrum: lexicographic k-mer order, normalised to sum 1."""
    kmers = ["".join(p) for p in product("ACGT", repeat=k)]
    index = {km: i for i, km in enumerate(kmers)}
    counts = np.zeros(len(kmers))
    for i in range(len(seq) - k + 1):
        j = index.get(seq[i : i + k])
        if j is not None:
            counts[j] += 1
    return counts / counts.sum()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sc-dta {command}")
    assert "--help" in out


def test_top_level(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out
    assert main([]) == 2  # a command is required
    assert "required" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert dta.__version__ in capsys.readouterr().out
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)


def test_python_m():
    res = subprocess.run(
        [sys.executable, "-m", "sc_dta", "rank", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "usage: sc-dta rank" in res.stdout


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sc-dta {command}: error:"), err
    return lines[0]


def test_bad_files(tmp_path, capsys):
    missing = tmp_path / "missing.h5ad"
    assert main(["annotate-tss", str(missing), "--gtf", str(missing)]) == 2
    assert "does not exist" in _one_line_error(capsys, "annotate-tss")

    junk = tmp_path / "junk.h5ad"
    junk.write_text("this is not an h5ad file\n")
    gtf = tmp_path / "genes.gtf"
    gtf.write_text("")
    assert main(["annotate-tss", str(junk), "--gtf", str(gtf)]) == 2
    msg = _one_line_error(capsys, "annotate-tss")
    assert "cannot read" in msg and "junk.h5ad" in msg

    assert main(["rank", str(tmp_path)]) == 2
    assert "is a directory" in _one_line_error(capsys, "rank")

    assert main(["prefetch", "no-such-entry-xyz"]) == 2
    assert "no-such-entry-xyz" in _one_line_error(capsys, "prefetch")


def test_prefetch_list(capsys):
    assert main(["prefetch", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert set(names) == set(dta.datasets.registry())


def test_bad_options(tmp_path, capsys):
    assert main(["train", "x.h5ad", "--model-out", str(tmp_path), "--epochs", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["demo", "--encoder", "bogus"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["perturb-gene", "x.h5ad", "--gene", "G"]) == 2  # --model missing
    assert "--model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The CLI pipeline on a tiny simulated data set, each step reading and writing .h5ad files."""
    import sc_dta as dta

    tmp = tmp_path_factory.mktemp("cli")
    dta.settings.progress = False
    dta.settings.cache_dir = tmp / "cache"
    sim = dta.datasets.simulated_grn(n_cells=240, n_genes=130, n_markers=10, seed=5, out_dir=tmp / "genome")
    raw = tmp / "raw.h5ad"
    sim.adata.write_h5ad(raw)
    steps = {}
    a1 = tmp / "tss.h5ad"
    steps["annotate"] = main(["annotate-tss", str(raw), "--gtf", str(sim.gtf), "-o", str(a1)])
    a2 = tmp / "dna.h5ad"
    steps["embed"] = main(
        ["embed-dna", str(a1), "--genome", str(sim.fasta), "--encoder", "kmer", "--window", "512", "-o", str(a2)]
    )
    model = tmp / "model"
    steps["train"] = main(
        ["train", str(a2), "--model-out", str(model), "--epochs", "1", "--hidden-size", "32", "--batch-size", "16"]
    )
    a3 = tmp / "tss_mut.h5ad"
    steps["perturb_tss"] = main(
        [
            "perturb-tss",
            str(a2),
            "--model",
            str(model),
            "--gene",
            sim.tf_symbol,
            "--mutation",
            sim.mutation,
            "--genome",
            str(sim.fasta),
            "--window",
            "512",
            "--cells",
            "cell_type=cardiomyocyte",
            "-o",
            str(a3),
        ]
    )
    steps["perturb_gene"] = main(["perturb-gene", str(a3), "--model", str(model), "--gene", sim.tf])  # in place
    direct, indirect = tmp / "direct.txt", tmp / "indirect.txt"
    direct.write_text("# planted direct targets\n" + "\n".join(sim.truth["direct"]) + "\n")
    indirect.write_text(",".join(sim.truth["indirect"]))
    csv = tmp / "ranking.csv"
    steps["rank"] = main(
        [
            "rank",
            str(a3),
            "--targets",
            f"direct={direct}",
            "--targets",
            str(indirect),
            "--csv",
            str(csv),
            "--top-k",
            "10",
        ]
    )
    png = tmp / "shift.png"
    steps["plot"] = main(
        [
            "plot",
            str(a3),
            "-o",
            str(png),
            "--compare",
            "dta_shift_delete",
            "--targets",
            f"direct={direct}",
            "--gene-symbols",
            "gene_symbol",
        ]
    )
    return {
        "sim": sim,
        "tmp": tmp,
        "steps": steps,
        "files": {"raw": raw, "tss": a1, "dna": a2, "result": a3},
        "model": model,
        "csv": csv,
        "png": png,
    }


def test_pipeline_exit_codes(pipeline):
    assert pipeline["steps"] == dict.fromkeys(pipeline["steps"], 0)


def test_pipeline_annotate_and_embed(pipeline):
    sim = pipeline["sim"]
    a1 = ad.read_h5ad(pipeline["files"]["tss"])
    expected = _canonical_tss(sim.gtf)
    for gene in a1.var_names[:40]:
        chrom, pos, strand = expected[gene]
        row = a1.var.loc[gene]
        assert (row["tss_chrom"], int(row["tss_pos"]), row["tss_strand"]) == (chrom, pos, strand)
    raw = ad.read_h5ad(pipeline["files"]["raw"])
    assert "tss_pos" not in raw.var  # -o leaves the input untouched

    a2 = ad.read_h5ad(pipeline["files"]["dna"])
    emb = a2.varm["dna_emb"]
    assert emb.shape == (a2.n_vars, 256)
    seqs = _read_fasta(sim.fasta)
    for gene in [sim.tf, *sim.truth["direct"][:2], a2.var_names[0]]:
        chrom, pos, strand = expected[gene]
        win = seqs[chrom][pos - 256 : pos + 256] if strand == "+" else _revcomp(seqs[chrom][pos - 255 : pos + 257])
        np.testing.assert_allclose(emb[a2.var_names.get_loc(gene)], _kmer_spectrum(win), atol=1e-6)


def test_pipeline_model_and_perturbations(pipeline):
    sim = pipeline["sim"]
    model = dta.models.BioDTA.from_pretrained(pipeline["model"], device="cpu")
    assert model.backbone.config.hidden_size == 32
    assert len(model.loss_history) > 0
    res = ad.read_h5ad(pipeline["files"]["result"])
    for key in ("dta_shift", "dta_shift_delete"):
        assert key in res.layers and f"{key}_mean" in res.var
    evaluated = res.obs["dta_shift_evaluated"].to_numpy()
    assert evaluated.any()
    assert (res.obs.loc[evaluated, "cell_type"] == "cardiomyocyte").all()  # --cells
    assert res.uns["dta_shift"]["params"]["mutation"] == sim.mutation
    assert res.obs["dta_shift_delete_evaluated"].sum() >= evaluated.sum()  # all cells with the TF
    assert np.isnan(res.var.loc[sim.tf, "dta_shift_mean"])


def test_pipeline_rank_and_plot(pipeline, capsys):
    sim = pipeline["sim"]
    res = ad.read_h5ad(pipeline["files"]["result"])
    table = pd.read_csv(pipeline["csv"], index_col=0)
    means = res.var["dta_shift_mean"].dropna()
    signed = res.uns["dta_shift"]["params"].get("readout", "cosine") != "cosine"  # signed: ranked by magnitude
    order = (means.abs() if signed else means).sort_values(ascending=False, kind="stable").index
    assert list(table.index) == list(order)
    np.testing.assert_allclose(table["mean_shift"].to_numpy(), means[order].to_numpy(), rtol=1e-6)
    assert set(table.index[table["target_direct"]]) == set(sim.truth["direct"]) & set(table.index)
    assert set(table.index[table["target_indirect"]]) == set(sim.truth["indirect"]) & set(table.index)
    assert pipeline["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rank prints the ranking and the metrics; an unknown key is a one-line error
    assert main(["rank", str(pipeline["files"]["result"]), "--show", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == table.index[0]
    assert main(["rank", str(pipeline["files"]["result"]), "--key", "nope"]) == 2
    assert "nope" in _one_line_error(capsys, "rank")


def test_user_errors_on_real_files(pipeline, capsys):
    files = pipeline["files"]
    out = pipeline["tmp"] / "never.h5ad"
    assert (
        main(["perturb-gene", str(files["dna"]), "--model", str(pipeline["model"]), "--gene", "NOPE1", "-o", str(out)])
        == 2
    )
    assert "NOPE1" in _one_line_error(capsys, "perturb-gene")
    assert not out.exists()
    assert main(["train", str(files["tss"]), "--model-out", str(pipeline["tmp"] / "m2")]) == 2
    assert "embed-dna" in _one_line_error(capsys, "train")
    assert main(["perturb-gene", str(files["dna"]), "--model", str(pipeline["tmp"]), "--gene", "X"]) == 2
    assert "--model" in _one_line_error(capsys, "perturb-gene")
    assert (
        main(
            [
                "perturb-tss",
                str(files["dna"]),
                "--model",
                str(pipeline["model"]),
                "--gene",
                pipeline["sim"].tf,
                "--genome",
                str(pipeline["sim"].fasta),
                "--window",
                "512",
            ]
        )
        == 2
    )
    assert "--mutation" in _one_line_error(capsys, "perturb-tss")
    assert (
        main(
            ["perturb-tss", str(files["dna"]), "--model", "m", "--gene", "G", "--genome", "nope.fa", "--mutation", "x"]
        )
        == 2
    )
    assert "nope.fa" in _one_line_error(capsys, "perturb-tss")
    assert main(["plot", str(files["result"]), "-o", str(pipeline["tmp"] / "no" / "dir.png")]) == 2
    assert "does not exist" in _one_line_error(capsys, "plot")
    sim = pipeline["sim"]
    args = ["perturb-tss", str(files["dna"]), "--model", str(pipeline["model"]), "--gene", sim.tf]
    args += ["--genome", str(sim.fasta), "--window", "512", "--mutation", sim.mutation, "-o", str(out)]
    assert main([*args, "--cells", "bad"]) == 2
    assert "OBS_KEY=VALUE" in _one_line_error(capsys, "perturb-tss")
    assert main([*args, "--cells", "cell_type=neuron"]) == 2
    assert "selects no cells" in _one_line_error(capsys, "perturb-tss")
    assert main([*args[:-2], "--mutation", "chr1:5:Q>T", "-o", str(out)]) == 2
    _one_line_error(capsys, "perturb-tss")
    assert not out.exists()


def test_perturb_gene_key_follows_kind():
    args = build_parser().parse_args(
        ["perturb-gene", "in.h5ad", "--model", "m", "--gene", "G", "--kind", "overexpress"]
    )
    assert args.key_added is None  # perturb_gene then writes dta_shift_overexpress, not dta_shift_delete


@pytest.fixture
def result_file(tmp_path):
    """A small perturbation result (laid out as perturb_tss writes it) with var['gene_symbols'], as .h5ad."""
    from test_rank import shift_adata

    a, _, _ = shift_adata(seed=3)
    path = tmp_path / "result.h5ad"
    a.write_h5ad(path)
    return path, a


def test_rank_gene_symbols(result_file, tmp_path, capsys):
    path, a = result_file
    csv = tmp_path / "rank.csv"
    assert main(["rank", str(path), "--show", "4", "--csv", str(csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "symbol"
    table = pd.read_csv(csv, index_col=0)
    assert list(table["symbol"]) == ["sym" + g[1:] for g in table.index]  # the symbol of each var name
    first = lines[1].split()
    assert first[:2] == [table.index[0], table["symbol"].iloc[0]]
    # an explicit column, and none
    a.var["other"] = [f"o{j}" for j in range(a.n_vars)]
    a.write_h5ad(path)
    assert main(["rank", str(path), "--show", "2", "--gene-symbols", "other"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == "o" + table.index[0][1:]
    assert main(["rank", str(path), "--show", "2", "--gene-symbols", "none", "--csv", str(csv)]) == 0
    assert "symbol" not in capsys.readouterr().out
    assert "symbol" not in pd.read_csv(csv, index_col=0).columns
    assert main(["rank", str(path), "--gene-symbols", "nope"]) == 2
    assert "nope" in _one_line_error(capsys, "rank")


def test_plot_gene_symbols_default_auto(result_file, tmp_path, monkeypatch):
    import matplotlib.figure

    path, _ = result_file
    seen = []
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):  # observe the figure the command saves (and save it for real)
        seen.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    assert main(["plot", str(path), "-o", str(tmp_path / "a.png"), "--n-top", "3"]) == 0
    assert main(["plot", str(path), "-o", str(tmp_path / "b.png"), "--n-top", "3", "--gene-symbols", "none"]) == 0
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    auto, off = ([t.get_text() for t in fig.axes[0].get_yticklabels()] for fig in seen)
    assert all(t.startswith("sym") for t in auto) and all(t.startswith("G") for t in off)
    assert [t[3:] for t in auto] == [t[1:] for t in off]


def _help_entries(text: str) -> list[str]:
    """Each option's (or positional's) help entry of an argparse --help text, continuation lines joined."""
    import re

    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line.strip())
        elif line.startswith("   ") and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append("")  # a section title or a blank line ends the entry
    return [e for e in entries if e]


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_states_each_default_once(command, capsys):
    assert main(["--help"] if command is None else [command, "--help"]) == 0
    entries = _help_entries(capsys.readouterr().out)
    assert entries
    for entry in entries:
        assert entry.lower().count("default") <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    if command == "rank":
        show = next(e for e in entries if e.startswith("--show"))
        assert show.endswith("(default: 20)")
    if command == "embed-dna":
        device = next(e for e in entries if e.startswith("--device"))
        assert device.endswith("(default: settings)")


def test_global_options_after_the_command(tmp_path, capsys, monkeypatch):
    from sc_dta.cli import CLIError

    args = build_parser().parse_args(["rank", "x.h5ad", "--debug", "-q", "-vv"])
    assert args.sub_debug and args.sub_quiet and args.sub_verbose == 2
    missing = str(tmp_path / "missing.h5ad")
    assert main(["rank", missing]) == 2  # a one-line error ...
    _one_line_error(capsys, "rank")
    with pytest.raises(CLIError, match="does not exist"):  # ... and with --debug after the command, the exception
        main(["rank", missing, "--debug"])
    monkeypatch.setattr(dta.settings, "progress", True)
    monkeypatch.setattr(dta.settings, "verbosity", "WARNING")  # restored after the test
    assert main(["prefetch", "--list", "--quiet", "-v"]) == 0
    assert dta.settings.progress is False and dta.settings.verbosity == "INFO"
    assert main(["-v", "prefetch", "--list", "-v"]) == 0  # before and after add up
    assert dta.settings.verbosity == "DEBUG"


def test_closed_stdout_is_not_a_traceback():
    """`sc-dta prefetch --list | head -0`: the reader has gone before anything is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sc_dta", "prefetch", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # long before the command prints (importing takes a while)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_rank_show_zero_prints_no_table(result_file, tmp_path, capsys):
    path, a = result_file
    assert main(["rank", str(path), "--show", "0"]) == 0
    assert capsys.readouterr().out == ""
    targets = tmp_path / "t.txt"
    targets.write_text("G1\nG2\nG3\n")
    assert main(["rank", str(path), "--show", "0", "--targets", str(targets)]) == 0
    out = capsys.readouterr().out
    assert "Empty DataFrame" not in out
    lines = out.splitlines()
    assert "auroc" in lines[0] and lines[1].split()[0] == "t"  # only the metrics, no blank line first


def test_layer_option_reads_raw_counts_after_log1p(pipeline, tmp_path, capsys):
    import anndata as ad
    import numpy as np

    files = pipeline["files"]
    logged = ad.read_h5ad(files["dna"])
    logged.layers["counts"] = logged.X.copy()
    logged.X = np.log1p(logged.X)  # what sc.pp.log1p leaves in X
    path = tmp_path / "logged.h5ad"
    logged.write_h5ad(path)
    gene = logged.uns["simulated_grn"]["tf"]
    base = ["perturb-gene", str(path), "--model", str(pipeline["model"]), "--gene", gene]
    assert main([*base, "-o", str(tmp_path / "no.h5ad")]) == 2
    assert "raw" in _one_line_error(capsys, "perturb-gene")
    out = tmp_path / "yes.h5ad"
    assert main([*base, "--layer", "counts", "--readout", "cosine", "-o", str(out)]) == 0
    res = ad.read_h5ad(out)
    assert res.uns["dta_shift_delete"]["params"]["layer"] == "counts"
    assert res.uns["dta_shift_delete"]["params"]["readout"] == "cosine"

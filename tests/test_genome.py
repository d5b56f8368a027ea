from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _genome_data import expected_window, revcomp, write_test_genome

import sc_dta as dta
from sc_dta.genome import Genome, read_tss

# hand-checkable tiny chromosome: index 0..19
CHR_S = "GATTACACCGGTTAAGCTAG"


@pytest.fixture
def tiny(tmp_path) -> Genome:
    path = tmp_path / "tiny.fa"
    path.write_text(">chrS\n" + CHR_S[:8] + "\n" + CHR_S[8:16] + "\n" + CHR_S[16:] + "\n>chrT\nacgtNNacgt\n")
    return Genome(path)


@pytest.fixture
def test_genome(tmp_path):
    return write_test_genome(tmp_path)


# --------------------------------------------------------------------------------------------------
# Genome basics


def test_tiny_genome_basics(tiny):
    assert tiny.name == "tiny"
    assert tiny.chromosomes == ["chrS", "chrT"]
    assert tiny.chrom_length("chrS") == 20
    assert tiny.chrom_sizes == {"chrS": 20, "chrT": 10}
    assert tiny.fetch("chrS", 0, 20) == CHR_S
    assert tiny.fetch("chrS", 5, 12) == "CACCGGT"
    assert tiny.fetch("chrT", 0, 10) == "ACGTNNACGT"  # upper-cased
    assert tiny.fetch("chrS", -3, 2) == "NNNGA"
    assert tiny.fetch("chrS", 18, 23) == "AGNNN"
    assert tiny.fetch("chrS", 25, 27) == "NN"
    assert tiny.fetch("chrS", 4, 4) == ""
    assert "chrS" in tiny and "S" in tiny and "chrQ" not in tiny


def test_tiny_windows_by_hand(tiny):
    # odd length: [7, 14) = CCGGTTA, TSS base G (index 10) at position 3
    assert tiny.window("chrS", 10, 7, "+") == "CCGGTTA"
    assert tiny.window("chrS", 10, 7, "-") == "TAACCGG"
    # even length: + takes [7, 13), - takes [8, 14) so that the centre base is at index 3 either way
    assert tiny.window("chrS", 10, 6, "+") == "CCGGTT"
    assert tiny.window("chrS", 10, 6, "-") == "TAACCG"
    # N padding at both chromosome ends
    assert tiny.window("chrS", 1, 6, "+") == "NNGATT"
    assert tiny.window("chrS", 18, 6, "-") == "NNCTAG"
    assert tiny.window("chrS", 0, 1, "-") == "C"


@pytest.mark.parametrize("length", [1, 2, 7, 64, 1001, 2048])
def test_window_centre_and_strands(test_genome, length):
    fasta, _, expected = test_genome
    genome = Genome(fasta)
    seqs = expected["sequences"]
    for gene in expected["genes"].values():
        chrom, tss = gene["chrom"], gene["tss"]
        plus = genome.window(chrom, tss, length, "+")
        minus = genome.window(chrom, tss, length, "-")
        assert len(plus) == len(minus) == length
        assert plus == expected_window(seqs, chrom, tss, length, "+")
        assert minus == expected_window(seqs, chrom, tss, length, "-")
        assert plus[length // 2] == seqs[chrom][tss]
        assert minus[length // 2] == revcomp(seqs[chrom][tss])
        # minus strand = reverse complement of the plus-strand sequence around the same base
        lo = tss - (length - 1 - length // 2)
        assert minus == revcomp(genome.fetch(chrom, lo, lo + length))


def test_windows_near_chromosome_ends(test_genome):
    fasta, _, expected = test_genome
    genome = Genome(fasta)
    seqs = expected["sequences"]
    firrm = expected["genes"]["ENSG00000000460"]  # + strand, TSS 40 on chr2
    w = genome.window("chr2", firrm["tss"], 200, "+")
    assert w[:60] == "N" * 60 and "N" not in w[60:]
    assert w[60:] == seqs["chr2"][:140]
    scyl3 = expected["genes"]["ENSG00000000457"]  # - strand, TSS 6079 on chr2 (length 6100)
    w = genome.window("chr2", scyl3["tss"], 200, "-")
    # upstream (start of the oriented window) lies beyond the chromosome end: 100 - 20 = 80 Ns
    assert w[:80] == "N" * 80 and "N" not in w[80:]
    assert w[100] == revcomp(seqs["chr2"][6079])


def test_soft_masked_bases_upper_case(test_genome):
    fasta, _, expected = test_genome
    genome = Genome(fasta)
    seq = genome.fetch("chr1", 90, 310)
    assert seq == seq.upper() == expected["sequences"]["chr1"][90:310]


def test_gzip_fasta_decompressed_once_into_cache(tmp_path, test_genome):
    plain, _, expected = test_genome
    gz_fasta, _, _ = write_test_genome(tmp_path / "gz", fasta_format="gzip")
    g1 = Genome(gz_fasta)
    cached = list((Path(dta.settings.cache_dir) / "genomes").glob("genome-*.fa"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    g2 = Genome(gz_fasta, name="hg-test")
    assert g2.name == "hg-test" and g1.name == "genome"
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not decompressed again
    ref = Genome(plain)
    for chrom in ("chr1", "chr2"):
        assert g1.fetch(chrom, 0, expected["lengths"][chrom]) == ref.fetch(chrom, 0, expected["lengths"][chrom])
    assert not Path(f"{gz_fasta}.fai").exists()  # the gzip file itself is never indexed


def test_split_per_chromosome_files(tmp_path):
    paths, _, expected = write_test_genome(tmp_path / "split", fasta_format="split")
    genome = Genome(paths)
    assert genome.chromosomes == ["chr1", "chr2"]
    assert genome.name == "split"
    assert genome.fetch("chr2", 100, 200) == expected["sequences"]["chr2"][100:200]


def _write_bgzf(path: Path, data: bytes, block: int = 500) -> None:
    """Minimal BGZF writer (gzip members with the BC extra field, then the EOF block)."""
    out = bytearray()
    for i in range(0, len(data), block):
        chunk = data[i : i + block]
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        cdata = comp.compress(chunk) + comp.flush()
        bsize = len(cdata) + 25
        out += (
            b"\x1f\x8b\x08\x04"
            + b"\x00" * 4
            + b"\x00\xff"
            + struct.pack("<H", 6)
            + b"BC"
            + struct.pack("<HH", 2, bsize)
        )
        out += cdata + struct.pack("<II", zlib.crc32(chunk) & 0xFFFFFFFF, len(chunk))
    out += bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")  # the standard BGZF EOF block
    path.write_bytes(bytes(out))


def test_bgzip_fasta(tmp_path, test_genome):
    plain, _, expected = test_genome
    bgz = tmp_path / "bgz" / "genome.fa.gz"
    bgz.parent.mkdir()
    _write_bgzf(bgz, Path(plain).read_bytes())
    assert gzip.decompress(bgz.read_bytes()) == Path(plain).read_bytes()
    genome = Genome(bgz)
    assert genome.fetch("chr1", 5000, 5100) == expected["sequences"]["chr1"][5000:5100]


def test_genome_errors(tmp_path, tiny):
    with pytest.raises(KeyError, match=r"chrZ.*chrS"):
        tiny.window("chrZ", 5, 10)
    with pytest.raises(KeyError, match="chrZ"):
        tiny.fetch("chrZ", 0, 5)
    with pytest.raises(ValueError, match="strand"):
        tiny.window("chrS", 5, 10, strand="minus")
    with pytest.raises(ValueError, match="length"):
        tiny.window("chrS", 5, 0)
    with pytest.raises(ValueError, match="center 20 is outside"):
        tiny.window("chrS", 20, 5)
    with pytest.raises(ValueError, match="center"):
        tiny.window("chrS", 2.5, 5)
    with pytest.raises(ValueError, match="end"):
        tiny.fetch("chrS", 5, 2)
    with pytest.raises(FileNotFoundError, match="nope.fa"):
        Genome(tmp_path / "nope.fa")
    dup = tmp_path / "dup.fa"
    dup.write_text(">chrS\nACGT\n")
    with pytest.raises(ValueError, match="chrS"):
        Genome([tmp_path / "tiny.fa", dup])


def test_chromosome_aliases(tmp_path):
    path = tmp_path / "ensembl.fa"
    path.write_text(">1\nACGTACGT\n>MT\nGGGG\n")
    genome = Genome(path)
    assert genome.fetch("chr1", 0, 4) == "ACGT"
    assert genome.chrom_length("chrM") == 4
    assert genome.window("chr1", 3, 3, "-") == revcomp("GTA")


def test_large_window_fetch(tmp_path):
    rng = np.random.default_rng(1)
    seq = "".join(np.array(list("ACGT"))[rng.integers(0, 4, 400_000)])
    path = tmp_path / "big.fa"
    path.write_text(">chrB\n" + "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60)) + "\n")
    genome = Genome(path)
    w = genome.window("chrB", 200_000, 196_608, "-")
    assert len(w) == 196_608
    assert w == revcomp(seq[200_000 - 98_303 : 200_000 + 98_305])


# --------------------------------------------------------------------------------------------------
# GTF -> TSS


@pytest.mark.parametrize("gz", [False, True])
def test_read_tss_hand_computed(tmp_path, gz):
    _, gtf, expected = write_test_genome(tmp_path, gtf_gz=gz)
    table = read_tss(gtf)
    assert list(table.columns) == ["gene_name", "chrom", "tss", "strand", "transcript_id"]
    assert table.index.name == "gene_id"
    assert sorted(table.index) == sorted(expected["genes"])
    assert table["tss"].dtype == np.int64
    for gene_id, exp in expected["genes"].items():
        row = table.loc[gene_id]
        assert row["chrom"] == exp["chrom"]
        assert row["tss"] == exp["tss"], gene_id
        assert row["strand"] == exp["strand"]
        assert row["transcript_id"] == exp["transcript_id"]
        assert row["gene_name"] == exp["gene_name"]


def test_read_tss_tss_base_is_first_transcribed_base(tmp_path):
    fasta, gtf, expected = write_test_genome(tmp_path)
    genome = Genome(fasta)
    table = read_tss(gtf)
    # the DPM1 canonical transcript 1501-2500 (1-based): first transcribed base = 1-based 1501 = 0-based 1500
    assert table.loc["ENSG00000000419", "tss"] == 1501 - 1
    # TSPAN6 canonical transcript 3001-5500 on '-': first transcribed base = 1-based 5500
    assert table.loc["ENSG00000000003", "tss"] == 5500 - 1
    w = genome.window("chr1", 5499, 11, "-")
    assert w[5] == revcomp(expected["sequences"]["chr1"][5499])


def test_read_tss_par_y_and_versions(tmp_path):
    gtf = tmp_path / "par.gtf"
    rows = [
        ("chrX", 1001, 2000, "+", 'gene_id "ENSG00000002586.20"; transcript_id "ENST1.1"; gene_name "CD99";'),
        (
            "chrY",
            5001,
            6000,
            "+",
            'gene_id "ENSG00000002586.20_PAR_Y"; transcript_id "ENST1.1_PAR_Y"; gene_name "CD99";',
        ),
        ("chr3", 10, 500, "-", 'gene_id "ENSG00000000099"; transcript_id "ENST9"; gene_name "NOVERSION";'),
        ("chr3", 10, 700, "-", 'gene_id "ENSG00000000099"; transcript_id "ENST8";'),
    ]
    lines = ["#!genome-build GRCh38"]
    for chrom, start, end, strand, attrs in rows:
        lines.append(f"{chrom}\tENSEMBL\ttranscript\t{start}\t{end}\t.\t{strand}\t.\t{attrs}")
        lines.append(f"{chrom}\tENSEMBL\texon\t{start}\t{end}\t.\t{strand}\t.\t{attrs} exon_number 1;")
    gtf.write_text("\n".join(lines) + "\n")
    table = read_tss(gtf)
    assert list(table.index) == ["ENSG00000000099", "ENSG00000002586"]
    assert table.loc["ENSG00000002586", "chrom"] == "chrX"
    assert table.loc["ENSG00000002586", "tss"] == 1000
    assert table.loc["ENSG00000000099", "tss"] == 699  # most 5' on '-': largest end
    assert table.loc["ENSG00000000099", "transcript_id"] == "ENST8"


def test_read_tss_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gtf"):
        read_tss(tmp_path / "missing.gtf")
    gff = tmp_path / "only_genes.gtf"
    gff.write_text('chr1\tX\tgene\t1\t100\t.\t+\t.\tgene_id "G1";\n')
    with pytest.raises(ValueError, match="no 'transcript' rows"):
        read_tss(gff)


def test_read_tss_disk_cache_and_missing_final_newline(tmp_path):
    import pandas as pd

    from sc_dta.genome import _gtf

    _, gtf, expected = write_test_genome(tmp_path)
    last = 'chr2\tX\ttranscript\t10\t20\t.\t-\t.\tgene_id "ENSG00000000777.1"; transcript_id "ENST7"; gene_name "LAST";'
    gtf.write_text(gtf.read_text() + last)  # a transcript as the last line, without its newline
    fresh = read_tss(gtf)
    assert len(fresh) == len(expected["genes"]) + 1
    assert fresh.loc["ENSG00000000777", "tss"] == 19
    cached = list((Path(dta.settings.cache_dir) / "tss").glob("genes-*.tsv"))
    assert len(cached) == 1
    _gtf._CACHE.clear()
    again = read_tss(gtf)  # from the disk cache
    pd.testing.assert_frame_equal(again, fresh)
    again.loc["ENSG00000000419", "tss"] = -1  # callers get copies
    assert read_tss(gtf).loc["ENSG00000000419", "tss"] == 1500

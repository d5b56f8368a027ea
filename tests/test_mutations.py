from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _genome_data import expected_window, revcomp, write_test_genome

from sc_dta.genome import Genome, RandomSubstitutions, TSSDeletion, Variant, parse_mutation, read_vcf

CHR_S = "GATTACACCGGTTAAGCTAG"  # index 0..19; the "TSS" used below is index 10 (G)


@pytest.fixture
def tiny(tmp_path) -> Genome:
    path = tmp_path / "tiny.fa"
    path.write_text(">chrS\n" + CHR_S + "\n")
    return Genome(path)


@pytest.fixture(scope="module")
def test_genome(tmp_path_factory):
    fasta, gtf, expected = write_test_genome(tmp_path_factory.mktemp("genome"))
    return Genome(fasta), expected


# --------------------------------------------------------------------------------------------------
# an independent implementation: apply variants to the whole chromosome, tracking where each base came from


def reference_mutated_window(seq: str, tss: int, length: int, strand: str, variants: list[Variant]) -> str:
    bases = [(b, i) for i, b in enumerate(seq)]  # (base, original index or None when inserted)
    for v in sorted(variants, key=lambda v: v.pos, reverse=True):
        start = v.pos - 1
        assert seq[start : start + len(v.ref)] == v.ref
        if len(v.ref) == len(v.alt):  # substitution: every base keeps its origin
            new = [(a, start + k) for k, a in enumerate(v.alt)]
        else:  # indel: the shared anchor prefix keeps its origin, the rest is new
            k = 0
            while k < min(len(v.ref), len(v.alt)) and v.ref[k] == v.alt[k]:
                k += 1
            new = [(a, start + j if j < k else None) for j, a in enumerate(v.alt)]
        bases[start : start + len(v.ref)] = new
    origins = [o for _, o in bases]
    if tss in origins:
        t = origins.index(tss)
    elif strand == "+":  # TSS deleted: first retained base after it in transcription orientation
        t = next(i for i, o in enumerate(origins) if o is not None and o > tss)
    else:
        t = max(i for i, o in enumerate(origins) if o is not None and o < tss)
    mutated = "".join(b for b, _ in bases)
    return expected_window({"c": mutated}, "c", t, length, strand)


# --------------------------------------------------------------------------------------------------
# hand-computed cases on a 20 bp chromosome


@pytest.mark.parametrize(
    ("mutation", "strand", "expected"),
    [
        (None, "+", "CCGGTTA"),
        (None, "-", "TAACCGG"),
        ("chrS:11:G>A", "+", "CCGATTA"),  # SNV on the TSS base
        ("chrS:11:G>A", "-", "TAATCGG"),
        ("chrS:9:C>CAA", "+", "AAGGTTA"),  # insertion of AA after index 8: TSS moves 2 bp right
        ("chrS:9:C>CAA", "-", "TAACCTT"),
        ("chrS:8:CCG>C", "+", "CACGTTA"),  # deletion of indices 8-9 just before the TSS
        ("chrS:11:GT>CA", "+", "CCGCATA"),  # MNV at the TSS (index 10 -> C) and index 11 (T -> A)
        ("delete:-1:+1", "+", "ACCTAAG"),  # deletes 9-11: centre on index 12 (first base after)
        ("delete:-1:+1", "-", "TTAGGTG"),  # deletes 9-11: centre on index 8 (first base after on -)
        ("delete:+1:+2", "+", "CCGGAAG"),  # deletes 11-12 downstream
        ("delete:-3:-2", "+", "CAGGTTA"),  # deletes 7-8 upstream
    ],
)
def test_hand_computed_mutated_windows(tiny, mutation, strand, expected):
    mutations = [] if mutation is None else [mutation]
    assert tiny.mutated_window("chrS", 10, 7, strand, mutations) == expected


def test_deletion_at_tss_equals_centring_rule(tiny):
    # on '+' the centre becomes index 12 of the chromosome with 9-11 removed
    mutated = CHR_S[:9] + CHR_S[12:]
    assert tiny.mutated_window("chrS", 10, 7, "+", "delete:-1:+1") == expected_window({"c": mutated}, "c", 9, 7, "+")


# --------------------------------------------------------------------------------------------------
# against the independent implementation on the test genome, both strands, odd and even lengths


def _variants_around(seq: str, chrom: str, tss: int, strand: str) -> list[list[Variant]]:
    def snv(i):
        ref = seq[i]
        return Variant(chrom, i + 1, ref, "A" if ref != "A" else "C")

    def ins(i, extra):  # insert after index i
        return Variant(chrom, i + 1, seq[i], seq[i] + extra)

    def dele(i, n):  # delete n bases after index i
        return Variant(chrom, i + 1, seq[i : i + 1 + n], seq[i])

    return [
        [snv(tss)],
        [snv(tss - 7), snv(tss + 9)],
        [ins(tss - 5, "GATTACA")],
        [ins(tss + 4, "TT")],
        [ins(tss - 1, "CC")],  # right before the TSS base
        [dele(tss - 12, 6)],
        [dele(tss + 3, 10)],
        [dele(tss - 3, 5)],  # covers the TSS
        [Variant(chrom, tss - 19, seq[tss - 20 : tss - 18], "TC" if seq[tss - 20 : tss - 18] != "TC" else "GA")],
        [ins(tss - 30, "ACGTACGT"), dele(tss - 10, 4), snv(tss), dele(tss + 6, 3), ins(tss + 20, "G")],
    ]


@pytest.mark.parametrize("gene_id", ["ENSG00000000419", "ENSG00000000003", "ENSG00000000938"])
@pytest.mark.parametrize("length", [101, 100])
def test_variants_match_independent_implementation(test_genome, gene_id, length):
    genome, expected = test_genome
    gene = expected["genes"][gene_id]
    chrom, tss, strand = gene["chrom"], gene["tss"], gene["strand"]
    seq = expected["sequences"][chrom]
    for variants in _variants_around(seq, chrom, tss, strand):
        for s in ("+", "-"):
            got = genome.mutated_window(chrom, tss, length, s, variants)
            want = reference_mutated_window(seq, tss, length, s, variants)
            assert len(got) == length
            assert got == want, (variants, s)
        # spec strings give the same result as the objects
        assert genome.mutated_window(chrom, tss, length, strand, [str(v) for v in variants]) == genome.mutated_window(
            chrom, tss, length, strand, variants
        )


@pytest.mark.parametrize("strand", ["+", "-"])
@pytest.mark.parametrize(("start", "end"), [(-100, 50), (-20, -5), (3, 30), (0, 0), (-40, 0), (0, 40)])
def test_tss_deletion_matches_independent_implementation(test_genome, strand, start, end):
    genome, expected = test_genome
    gene = expected["genes"]["ENSG00000000005"]  # chr1, TSS 6800
    chrom, tss = gene["chrom"], gene["tss"]
    seq = expected["sequences"][chrom]
    if strand == "+":
        first, last = tss + start, tss + end
    else:
        first, last = tss - end, tss - start
    # the same deletion written by hand as a VCF variant with its anchor base
    variant = Variant(chrom, first, seq[first - 1 : last + 1], seq[first - 1])
    got = genome.mutated_window(chrom, tss, 301, strand, f"delete:{start}:{end}")
    assert got == reference_mutated_window(seq, tss, 301, strand, [variant])
    assert TSSDeletion(start, end).to_variants(genome, chrom, tss, strand) == [variant]
    # length kept; when the TSS is deleted the centre is the first retained base after it
    assert len(got) == 301
    plain = genome.window(chrom, tss, 301, strand)
    n_deleted = end - start + 1
    if start > 0:  # downstream deletion: upstream half unchanged
        assert got[: 150 + start] == plain[: 150 + start]
        assert got[150 + start :] == plain[150 + start + n_deleted :] + got[301 - n_deleted :]
    elif end < 0:  # upstream deletion: downstream half unchanged
        assert got[150 + end + 1 :] == plain[150 + end + 1 :]
    else:  # TSS deleted: centre = base at relative position end + 1 of the reference
        ref_long = genome.window(chrom, tss, 1001, strand)
        assert got[150] == ref_long[500 + end + 1]


def test_mutation_at_chromosome_start_and_end(test_genome):
    genome, expected = test_genome
    seq = expected["sequences"]["chr2"]
    # FIRRM: '+', TSS 40 near the start of chr2; delete the first 10 bases of the chromosome
    got = genome.mutated_window("chr2", 40, 120, "+", "delete:-40:-31")
    assert got == "N" * 30 + seq[10:100]
    # SCYL3: '-', TSS 6079 near the end (length 6100); a deletion at the very start of the chromosome is refused
    with pytest.raises(ValueError, match="beyond the chromosome"):
        genome.mutated_window("chr2", 6079, 120, "-", "delete:-30:-1")
    got = genome.mutated_window("chr2", 6079, 120, "-", "delete:-20:-1")  # removes 6080..6099, the last 20 bases
    assert got == revcomp(seq[6079 - 59 : 6080] + "N" * 60)


# --------------------------------------------------------------------------------------------------
# random substitutions


@pytest.mark.parametrize("strand", ["+", "-"])
def test_random_substitutions(test_genome, strand):
    genome, expected = test_genome
    gene = expected["genes"]["ENSG00000000419"]
    chrom, tss = gene["chrom"], gene["tss"]
    ref = genome.window(chrom, tss, 501, strand)
    got = genome.mutated_window(chrom, tss, 501, strand, "random:12:30", seed=3)
    diff = [i for i in range(501) if got[i] != ref[i]]
    assert len(diff) == 12
    assert all(abs(i - 250) <= 30 for i in diff)
    assert all(got[i] in "ACGT" and got[i] != ref[i] for i in diff)
    assert got == genome.mutated_window(chrom, tss, 501, strand, "random:12:30", seed=3)  # deterministic
    other = genome.mutated_window(chrom, tss, 501, strand, "random:12:30", seed=4)
    assert other != got
    # the object's own seed wins over the call's seed
    assert genome.mutated_window(chrom, tss, 501, strand, "random:12:30:3", seed=99) == got
    # to_variants gives SNVs whose reference alleles are the genome's
    variants = RandomSubstitutions(12, radius=30).to_variants(genome, chrom, tss, strand, seed=3)
    assert len({v.pos for v in variants}) == 12
    assert all(genome.fetch(chrom, v.pos - 1, v.pos) == v.ref and v.kind == "SNV" for v in variants)


def test_random_substitutions_skip_n_and_fail_when_too_few(tiny, tmp_path):
    path = tmp_path / "ns.fa"
    path.write_text(">chrN\n" + "N" * 20 + "ACG" + "N" * 20 + "\n")
    genome = Genome(path)
    got = genome.mutated_window("chrN", 21, 11, "+", "random:3:5")
    assert got[:4] == "NNNN" and got[7:] == "NNNN" and all(a != b for a, b in zip(got[4:7], "ACG", strict=True))
    with pytest.raises(ValueError, match="only 3 A/C/G/T bases"):
        genome.mutated_window("chrN", 21, 11, "+", "random:4:5")
    with pytest.raises(ValueError, match="outside the window"):
        tiny.mutated_window("chrS", 10, 7, "+", "random:1:4")


# --------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("spec", "cls", "text"),
    [
        ("chr8:11676959:C>T", Variant, "chr8:11676959:C>T"),
        ("chr8:11,676,959:c>t", Variant, "chr8:11676959:C>T"),
        ("chr1:100:A>AT", Variant, "chr1:100:A>AT"),
        ("chr1:100:AT>A", Variant, "chr1:100:AT>A"),
        ("chr1:100:AC>GT", Variant, "chr1:100:AC>GT"),
        ("delete:-100:+50", TSSDeletion, "delete:-100:+50"),
        ("delete:-100:50", TSSDeletion, "delete:-100:+50"),
        ("random:5", RandomSubstitutions, "random:5:200"),
        ("random:5:1000", RandomSubstitutions, "random:5:1000"),
        ("random:5:1000:7", RandomSubstitutions, "random:5:1000:7"),
    ],
)
def test_parse_mutation(spec, cls, text):
    m = parse_mutation(spec)
    assert isinstance(m, cls)
    assert str(m) == text
    assert parse_mutation(str(m)) == m
    assert parse_mutation(m) is m


def test_variant_fields_and_kinds():
    v = Variant.parse("chr8:11676959:C>T")
    assert (v.chrom, v.pos, v.ref, v.alt) == ("chr8", 11676959, "C", "T")
    assert v.kind == "SNV"
    assert Variant.parse("chr1:100:A>AT").kind == "insertion"
    assert Variant.parse("chr1:100:AT>A").kind == "deletion"
    assert Variant.parse("chr1:100:AC>GT").kind == "MNV"
    assert Variant.parse("chr1:100:ACG>T").kind == "complex"
    assert TSSDeletion.parse("delete:-100:+50") == TSSDeletion(-100, 50)
    assert RandomSubstitutions.parse("random:3:10") == RandomSubstitutions(3, radius=10)


@pytest.mark.parametrize(
    "spec",
    [
        "chr8:0:C>T",
        "chr8:12:C>C",
        "chr8:12:C>",
        "chr8:x:C>T",
        "chr8:12:C>T>A",
        "chr8:12:C>Z",
        "chr1:100:A><DEL>",
        "chr8-12-C-T",
        "delete:50:-100",
        "delete:-1",
        "delete:a:b",
        "random:0",
        "random:x",
        "random:-3",
        "GATA4",
        "",
    ],
)
def test_bad_mutation_strings(spec):
    with pytest.raises(ValueError) as err:
        parse_mutation(spec)
    assert repr(spec) in str(err.value)


def test_bad_mutation_objects():
    with pytest.raises(ValueError, match="pos"):
        Variant("chr1", 1.5, "A", "C")
    with pytest.raises(ValueError, match="identical"):
        Variant("chr1", 3, "A", "a")
    with pytest.raises(ValueError, match="start"):
        TSSDeletion(5, 1)
    with pytest.raises(ValueError, match="radius"):
        RandomSubstitutions(3, radius=-1)
    with pytest.raises(ValueError, match="Mutation spec"):
        parse_mutation(42)


# --------------------------------------------------------------------------------------------------
# checks when applying


def test_reference_mismatch(tiny):
    with pytest.raises(ValueError) as err:
        tiny.mutated_window("chrS", 10, 7, "+", "chrS:11:A>T")
    msg = str(err.value)
    assert "chrS:11" in msg and "'A'" in msg and "'G'" in msg and "mismatch" in msg


def test_mutation_outside_window_or_chromosome(tiny, tmp_path):
    with pytest.raises(ValueError, match="outside the window"):
        tiny.mutated_window("chrS", 10, 7, "+", "chrS:2:A>T")
    with pytest.raises(ValueError, match="outside the window"):
        tiny.mutated_window("chrS", 10, 7, "+", "delete:-5:+5")  # reaches beyond the 7 bp window
    with pytest.raises(ValueError, match="outside the window"):
        tiny.mutated_window("chrS", 10, 7, "+", "chrQ:11:G>A")
    with pytest.raises(ValueError, match="beyond the end"):
        tiny.mutated_window("chrS", 18, 7, "+", "chrS:20:GA>G")
    with pytest.raises(KeyError, match="chrZ"):
        tiny.mutated_window("chrZ", 10, 7, "+", "chrZ:11:G>A")


def test_overlapping_variants_refused(tiny):
    with pytest.raises(ValueError, match="overlap"):
        tiny.mutated_window("chrS", 10, 7, "+", ["chrS:10:GG>G", "chrS:11:G>A"])


def test_no_mutations_is_the_plain_window(tiny):
    assert tiny.mutated_window("chrS", 10, 7, "-", []) == tiny.window("chrS", 10, 7, "-")


# --------------------------------------------------------------------------------------------------
# VCF

VCF = """##fileformat=VCFv4.2
##contig=<ID=chrS,length=20>
##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tdonor1\tdonor2
chrS\t8\t.\tCCG\tC\t.\tPASS\t.\tGT:DP\t0|1:10\t0/0:12
chrS\t11\trs1\tG\tA,T\t.\tPASS\t.\tGT\t0/2\t1|1
chrS\t13\t.\tT\t<DEL>\t.\tPASS\t.\tGT\t1/1\t0/1
chrS\t14\t.\tA\tAGG\t.\tPASS\t.\tGT\t./.\t0|1
"""


@pytest.mark.parametrize("gz", [False, True])
def test_read_vcf(tmp_path, tiny, gz):
    path = tmp_path / ("calls.vcf.gz" if gz else "calls.vcf")
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(VCF)
    else:
        path.write_text(VCF)
    everything = read_vcf(path)
    assert [str(v) for v in everything] == ["chrS:8:CCG>C", "chrS:11:G>A", "chrS:11:G>T", "chrS:14:A>AGG"]
    donor1 = read_vcf(path, sample="donor1")
    assert [str(v) for v in donor1] == ["chrS:8:CCG>C", "chrS:11:G>T"]
    donor2 = read_vcf(path, sample="donor2")
    assert [str(v) for v in donor2] == ["chrS:11:G>A", "chrS:14:A>AGG"]
    # donor1: delete indices 8-9, TSS G(10) -> T: ... C A C [T] T T A
    assert tiny.mutated_window("chrS", 10, 7, "+", donor1) == "CACTTTA"
    with pytest.raises(KeyError, match="donor3"):
        read_vcf(path, sample="donor3")
    with pytest.raises(FileNotFoundError, match="missing.vcf"):
        read_vcf(tmp_path / "missing.vcf")


@pytest.mark.parametrize("strand", ["+", "-"])
def test_relative_specs_refer_to_tss_when_window_is_shifted(test_genome, strand):
    genome, expected = test_genome
    gene = expected["genes"]["ENSG00000000005"]  # chr1, TSS 6800
    chrom, tss = gene["chrom"], gene["tss"]
    seq = expected["sequences"][chrom]
    shift = 64  # e.g. an encoder's center_shift, in transcription orientation
    center = tss + shift if strand == "+" else tss - shift
    first, last = (tss - 10, tss + 5) if strand == "+" else (tss - 5, tss + 10)
    variant = Variant(chrom, first, seq[first - 1 : last + 1], seq[first - 1])
    got = genome.mutated_window(chrom, center, 400, strand, "delete:-10:+5", tss=tss)
    assert got == reference_mutated_window(seq, center, 400, strand, [variant])
    assert got != genome.mutated_window(chrom, center, 400, strand, "delete:-10:+5")  # relative to the centre
    with pytest.raises(ValueError, match="outside the window"):
        genome.mutated_window(chrom, center, 400, strand, "random:3:150", tss=tss)
    assert len(genome.mutated_window(chrom, center, 400, strand, "random:3:130", tss=tss)) == 400

"""Independent readers of the simulated FASTA/GTF files, written for the tests (no sc_dta code)."""

from __future__ import annotations

import re


def revcomp(s: str) -> str:
    return s[::-1].translate(str.maketrans("ACGT", "TGCA"))


def read_fasta(path) -> dict[str, str]:
    seqs, name = {}, None
    for line in open(path):
        line = line.strip()
        if line.startswith(">"):
            name = line[1:].split()[0]
            seqs[name] = []
        elif line:
            seqs[name].append(line)
    return {k: "".join(v) for k, v in seqs.items()}


def canonical_tss(path) -> dict[str, tuple[str, int, str]]:
    """TSS (0-based) of the Ensembl_canonical transcript of each gene: ``{gene_id: (chrom, tss, strand)}``."""
    out = {}
    for line in open(path):
        if line.startswith("#"):
            continue
        f = line.rstrip("\n").split("\t")
        if f[2] != "transcript" or 'tag "Ensembl_canonical"' not in f[8]:
            continue
        gid = re.search(r'gene_id "([^"]+)"', f[8]).group(1).split(".")[0]
        start, end = int(f[3]) - 1, int(f[4]) - 1
        out[gid] = (f[0], start if f[6] == "+" else end, f[6])
    return out

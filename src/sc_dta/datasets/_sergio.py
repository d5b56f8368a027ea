"""A benchmark data set simulated with the third-party simulator SERGIO, with a synthetic genome."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sc_dta._settings import settings
from sc_dta.datasets._simulated import (
    CELL_TYPE_NAMES,
    DEFAULT_MOTIF,
    TARGET_MOTIF_POSITIONS,
    TF_MOTIF_POSITIONS,
    TF_MUTATION,
    SimulatedGRN,
    _fasta_text,
    _gtf_lines,
    _revcomp,
    _symbols,
    _write_if_changed,
    synthetic_genome,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

__all__ = ["sergio_grn"]

_VERSION = 1  # bump when the network design or the noise model changes (part of the cache key)
_SERGIO_PIN = "sergio-scsim==1.9.3"
_INSTALL_HINT = (
    f"sergio_grn needs the SERGIO simulator: pip install {_SERGIO_PIN} (it is part of the `test` extra: "
    "pip install 'sc-dta[test]')."
)

# ---- SERGIO's parameter conventions (its grnParam / mrProfile.build_rnd defaults) -----------------
_DECAY = 0.8  # SERGIO's default decay, the same for every gene
_HILL_N = 2.0  # SERGIO's default Hill coefficient
_K_ACT = (1.0, 5.0)  # activation strengths
_K_REP = (-5.0, -1.0)  # repression strengths
_RATE_LOW = (1.0, 2.5)  # master-regulator production rates of a "low" cell type
_RATE_HIGH = (3.5, 5.0)  # and of a "high" one
# ---- the planted TF's production rate per cell type -----------------------------------------------
_TF_RATE_FIRST = (4.5, 5.0)  # cardiomyocyte: high
_TF_RATE_SECOND = (2.0, 2.5)  # second cell type: intermediate
_TF_RATE_OTHER = (0.2, 0.6)  # all others: low
_HK_JITTER = 0.1  # housekeeping rates vary by up to ±10 % between cell types
_FIRST_LEVEL = 0.6  # share of a module's genes regulated by the module's master regulator itself
# ---- technical noise: SERGIO's splat-like helpers at the values of its steady-state demo -----------
_OUTLIER_PROB, _OUTLIER_MEAN, _OUTLIER_SCALE = 0.01, 0.8, 1.0
_LIBRARY_SCALE = 0.4
_DROPOUT_SHAPE = 6.5


def sergio_grn(
    n_cells: int = 3000,
    n_genes: int = 150,
    *,
    n_cell_types: int = 3,
    n_direct: int = 25,
    n_indirect: int = 20,
    n_modules: int = 3,
    n_housekeeping: int = 10,
    repressed_fraction: float = 0.2,
    library_size: float = 100.0,
    dropout_percentile: float = 82.0,
    noise_s: float = 1.0,
    dt: float = 0.05,
    safety_iter: int = 300,
    scale_iter: int = 4,
    n_chromosomes: int = 3,
    gene_spacing: int = 4000,
    tf_motif: str = DEFAULT_MOTIF,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
) -> SimulatedGRN:
    r"""Simulate single-cell UMI counts with SERGIO from a planted gene regulatory network, with a genome.

    A benchmark for data the package authors did not generate with their own model: the expression comes
    from SERGIO's stochastic differential equations (Dibaeinia & Sinha 2020, the PyPI package
    ``sergio-scsim`` 1.9.3, SERGIO v2), the technical noise from SERGIO's own splat-like helpers, and
    genome and annotation are made as in :func:`sc_dta.datasets.simulated_grn`, so that the whole pipeline
    (``annotate_tss`` → ``embed_dna`` → training → ``perturb_tss`` → ``rank_targets``) runs on it and is
    scored against the known network. Needs ``pip install sergio-scsim==1.9.3`` (in the ``test`` extra).

    **Network** (SERGIO ``GRN``/``Gene``/``SingleInteraction`` objects; decay 0.8, Hill coefficient 2,
    activation strengths :math:`k \sim U(1, 5)`, repression :math:`k \sim U(-5, -1)`, half-responses set by
    SERGIO to the regulator's mean steady-state level). Gene roles are placed at random genome positions:

    - the TF ``SIMTF1``, a master regulator with production rate :math:`U(4.5, 5)` in ``cardiomyocyte``,
      :math:`U(2, 2.5)` in the second cell type and :math:`U(0.2, 0.6)` in the others;
    - ``n_direct`` direct targets (``DIR*``), each regulated by the TF alone, ``round(repressed_fraction *
      n_direct)`` of them repressed, the others activated;
    - ``n_indirect`` indirect targets (``IND*``), each regulated by one or two direct targets and not by the
      TF (each edge repressing with probability ``repressed_fraction``);
    - ``n_housekeeping`` housekeeping genes (``HK*``): master regulators without targets, production rate
      :math:`U(3.5, 5)` varying by at most ±10 % between cell types;
    - ``n_modules`` unrelated programmes filling the remaining genes (``UNR*``, role ``'unrelated'``): each
      has its own master regulator, with a "high" :math:`U(3.5, 5)` or "low" :math:`U(1, 2.5)` rate per cell
      type (never the same level in all types, so modules are cell-type dependent too), regulating 60 % of
      its genes directly and the rest through one or two of those.

    **Expression.** SERGIO integrates the chemical Langevin equation of every gene (step ``dt``, noise
    amplitude ``noise_s``), one trajectory per cell type, starting at the deterministic steady state;
    after ``safety_iter`` burn-in steps, each cell is a random time point out of ``scale_iter`` steps per
    cell of its type (so cells of a type are correlated in time: at the defaults a type's 1000 cells span
    200 time units, about 80 independent states). The noise-free levels are kept in
    ``layers['sergio_expr']``.

    **Technical noise** with SERGIO's helpers, in its order: outlier genes (probability 0.01, log-normal
    factor with mean 0.8 and σ 1), library size (each cell rescaled to a log-normal total with median
    ``library_size`` and σ 0.4), dropout (logistic in :math:`\log(1 + x)` with shape 6.5, centred at the
    ``dropout_percentile``-th percentile of all entries) and Poisson UMI counts. Measured at the defaults
    (3000 cells × 150 genes, seed 0): 43 UMIs per cell (median; mean 56) and 22 detected genes (median;
    mean 24.5), 84 % zeros, 4 cells without any UMI, like sparse 10x data. ``library_size=1000,
    dropout_percentile=0`` gives dense data (median 1000 UMIs, 128 of 150 genes detected).

    **Genome and annotation** exactly as :func:`~sc_dta.datasets.simulated_grn`: ``n_chromosomes``
    chromosomes of random sequence (40 % GC), one gene per ``gene_spacing`` bp slot, a GENCODE-like GTF,
    ``tf_motif`` removed from the background and planted at ``TF_MOTIF_POSITIONS`` in the TF promoter and
    at ``TARGET_MOTIF_POSITIONS`` in every direct-target promoter (activated and repressed alike), so that
    the mutation ``"delete:-150:+50"`` removes all motifs from the TF promoter.

    The counts are cached in ``out_dir`` under a name made from the parameters (and the SERGIO version):
    the first call at the defaults takes about 20–25 s of CPU on one core (SERGIO is pure Python, 4–7 ms
    per step for 150 genes; 4300 steps), a second call 0.1 s. numpy's global random state, which SERGIO
    draws from, is seeded for the simulation and restored afterwards.

    Parameters
    ----------
    n_cells
        Number of cells, split as evenly as possible between the cell types.
    n_genes
        Number of genes; at least 1 + ``n_direct`` + ``n_indirect`` + ``n_housekeeping`` + 2 ×
        ``n_modules`` (each module needs a master regulator and one target).
    n_cell_types
        Number of cell types (2 to 8): ``'cardiomyocyte'``, ``'fibroblast'``, ``'endothelial'``, ….
    n_direct
        Direct targets of the TF (at least 1).
    n_indirect
        Indirect targets (regulated by direct targets only).
    n_modules
        Unrelated programmes, each a master regulator with its own targets; 0 only when no genes are left.
    n_housekeeping
        Housekeeping genes (master regulators without targets).
    repressed_fraction
        Fraction of the TF's edges that repress (and the probability that an indirect or module edge does).
    library_size
        Median total expression of a cell after SERGIO's library-size step, before dropout.
    dropout_percentile
        Percentile of the expression matrix where SERGIO's dropout probability is one half; 0 disables
        dropout.
    noise_s
        SERGIO's intrinsic noise amplitude.
    dt
        Integration step (SERGIO's default is 0.01; with decay 0.8, 0.05 biases the stationary variance by
        about 2 % and lets cells span five times more time at the same cost).
    safety_iter
        Burn-in steps before cells are sampled: 300 steps of 0.05 are 15 time units, twelve decay times
        (SERGIO's default of 50 steps of 0.01 is far from steady state).
    scale_iter
        Simulation steps per cell of a cell type (SERGIO's default 10; 4 keeps the defaults well under a
        minute).
    n_chromosomes
        Number of synthetic chromosomes.
    gene_spacing
        Bp between consecutive TSSs (at least 1000).
    tf_motif
        The TF binding motif (A/C/G/T, 6–30 bp, not its own reverse complement).
    seed
        Random seed: the same seed and parameters give identical counts, FASTA and GTF; another seed gives
        another network.
    out_dir
        Where ``genome.fa``, ``genes.gtf`` and the cached counts are written. Default:
        ``settings.cache_dir / "sergio" / <hash of the parameters>``.

    Returns
    -------
    :class:`~sc_dta.datasets._simulated.SimulatedGRN`, as from :func:`~sc_dta.datasets.simulated_grn`:

    - ``adata``: raw integer UMI counts in ``X`` (CSR), ``var_names`` ``ENSSIM00000000001`` …,
      ``var['gene_symbol']``, ``var['gene_id_version']``, ``var['sim_role']``, ``var['sim_programme']``
      (symbol of the master regulator whose programme the gene belongs to), ``obs['cell_type']``,
      ``obs['tf_activity']`` (the TF's noise-free level), ``obs['n_counts']``,
      ``layers['sergio_expr']`` (noise-free SERGIO expression, dense float32) and ``uns['sergio_grn']``
      (``params``, ``truth``, ``edges`` with each edge's regulator, target, ``k``, ``n`` and ``h``,
      ``production_rates`` of the master regulators, ``sergio_version``, the TF, motif and mutation);
    - ``truth``: ``'tf'``, ``'direct'``, ``'indirect'``, ``'housekeeping'``, ``'marker'`` (empty) and
      ``'unrelated'`` gene ids, pairwise disjoint and covering all genes;
    - ``fasta``, ``gtf``, ``tf``, ``tf_symbol``, ``tf_motif``, ``motif_positions``, ``mutation``, ``params``.

    Examples
    --------
    >>> import sc_dta as dta
    >>> sim = dta.datasets.sergio_grn(n_cells=600, seed=1)
    >>> dta.pp.annotate_tss(sim.adata, sim.gtf)
    """
    params = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_direct": n_direct,
        "n_indirect": n_indirect,
        "n_modules": n_modules,
        "n_housekeeping": n_housekeeping,
        "repressed_fraction": repressed_fraction,
        "library_size": library_size,
        "dropout_percentile": dropout_percentile,
        "noise_s": noise_s,
        "dt": dt,
        "safety_iter": safety_iter,
        "scale_iter": scale_iter,
        "n_chromosomes": n_chromosomes,
        "gene_spacing": gene_spacing,
        "tf_motif": tf_motif,
        "seed": seed,
    }
    _validate(params)
    params = _normalised(params)
    sergio_version = _sergio_version()

    types = list(CELL_TYPE_NAMES[: params["n_cell_types"]])
    seq_net, seq_genome, seq_sim = np.random.SeedSequence(int(params["seed"])).spawn(3)
    net = _design_network(np.random.default_rng(seq_net), params)

    # ---- genome and annotation (same construction as simulated_grn) -----------------------------
    rng_genome = np.random.default_rng(seq_genome)
    seqs, chrom_of, tss, strands = synthetic_genome(
        rng_genome, net.role, params["n_chromosomes"], params["gene_spacing"], params["tf_motif"]
    )
    gtf_lines = _gtf_lines(
        rng_genome, net.gene_ids, net.symbols, net.role, chrom_of, tss, strands, params["gene_spacing"]
    )

    # ---- network in SERGIO, expression from SERGIO (cached) ---------------------------------------
    grn, edges = _sergio_network(net, n_types=len(types))
    digest = _digest(params, sergio_version)
    out = Path(out_dir) if out_dir is not None else settings.cache_dir / "sergio" / digest
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"sergio_counts_{digest}.npz"
    n_per_type = np.array([len(a) for a in np.array_split(np.arange(params["n_cells"]), len(types))])
    cached = _read_cache(cache, params["n_cells"], params["n_genes"])
    if cached is None:
        counts, expr, cell_type = _simulate(grn, net, n_per_type, params, int(seq_sim.generate_state(1)[0]))
        _write_cache(cache, counts, expr, cell_type)
    else:
        counts, expr, cell_type = cached
        logger.info("SERGIO counts read from the cache %s", cache)

    # ---- assemble ---------------------------------------------------------------------------------
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    gene_ids = net.gene_ids.astype(str)
    truth = {r: [str(g) for g in gene_ids[net.role == r]] for r in ("tf", "direct", "indirect", "housekeeping")}
    truth["marker"] = []
    truth["unrelated"] = [str(g) for g in gene_ids[net.role == "unrelated"]]
    tf_index = int(np.flatnonzero(net.role == "tf")[0])
    tf_id = str(gene_ids[tf_index])
    var = pd.DataFrame(
        {
            "gene_symbol": net.symbols.astype(str),
            "gene_id_version": [f"{g}.1" for g in gene_ids],
            "sim_role": pd.Categorical(net.role.astype(str)),
            "sim_marker_of": [""] * len(gene_ids),
            "sim_programme": net.symbols[net.programme].astype(str),
        },
        index=pd.Index(gene_ids),
    )
    n_counts = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(types, dtype=object)[cell_type].astype(str), categories=types),
            "tf_activity": expr[:, tf_index].copy(),
            "n_counts": n_counts,
        },
        index=pd.Index([f"cell{i:05d}" for i in range(params["n_cells"])]),
    )
    adata = ad.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var, layers={"sergio_expr": expr})
    mrs = np.array(sorted(net.rates), dtype=np.int64)
    adata.uns["sergio_grn"] = {
        "params": dict(params),
        "tf": tf_id,
        "tf_motif": params["tf_motif"],
        "motif_positions": list(TF_MOTIF_POSITIONS),
        "target_motif_positions": list(TARGET_MOTIF_POSITIONS),
        "mutation": TF_MUTATION,
        "version": _VERSION,
        "sergio_version": sergio_version,
        "truth": {k: np.array(v, dtype=str) for k, v in truth.items()},
        "edges": edges,
        "production_rates": {
            "gene": gene_ids[mrs],
            "cell_type": np.array(types, dtype=str),
            "rate": np.stack([net.rates[int(g)] for g in mrs]),
        },
    }

    fasta = out / "genome.fa"
    gtf = out / "genes.gtf"
    _write_if_changed(fasta, _fasta_text(seqs))
    _write_if_changed(gtf, "".join(gtf_lines))
    logger.info("SERGIO: %d cells x %d genes; genome, annotation and counts in %s", *adata.shape, out)
    return SimulatedGRN(
        adata=adata,
        fasta=fasta,
        gtf=gtf,
        truth=truth,
        tf=tf_id,
        tf_symbol=str(net.symbols[tf_index]),
        tf_motif=params["tf_motif"],
        motif_positions=TF_MOTIF_POSITIONS,
        mutation=TF_MUTATION,
        params=params,
    )


# ------------------------------------------------------------------------------------------------
@dataclass
class _Network:
    """The planted network, in genome order (gene ``i`` is ``gene_ids[i]``)."""

    gene_ids: np.ndarray
    symbols: np.ndarray
    role: np.ndarray
    programme: np.ndarray  # index of the master regulator whose programme each gene belongs to
    edges: list[tuple[int, int, float]] = field(default_factory=list)  # (regulator, target, k)
    rates: dict[int, np.ndarray] = field(default_factory=dict)  # master regulator -> rate per cell type


def _design_network(rng: np.random.Generator, p: dict) -> _Network:
    n_genes, n_types = p["n_genes"], p["n_cell_types"]
    n_rest = n_genes - 1 - p["n_direct"] - p["n_indirect"] - p["n_housekeeping"]
    roles = np.array(
        ["tf"]
        + ["direct"] * p["n_direct"]
        + ["indirect"] * p["n_indirect"]
        + ["housekeeping"] * p["n_housekeeping"]
        + ["unrelated"] * n_rest,
        dtype=object,
    )
    order = rng.permutation(n_genes)  # genome position of each role slot
    role = np.empty(n_genes, dtype=object)
    role[order] = roles
    slots = {r: order[roles == r] for r in ("tf", "direct", "indirect", "housekeeping", "unrelated")}
    gene_ids = np.array([f"ENSSIM{i + 1:011d}" for i in range(n_genes)], dtype=object)
    symbols = _symbols(role, np.full(n_genes, "", dtype=object))
    net = _Network(gene_ids=gene_ids, symbols=symbols, role=role, programme=np.arange(n_genes))
    frac = float(p["repressed_fraction"])

    def strength(repressed: bool) -> float:
        lo, hi = _K_REP if repressed else _K_ACT
        return float(rng.uniform(lo, hi))

    def signs(n: int) -> np.ndarray:
        return rng.random(n) < frac

    # the TF and its programme
    tf = int(slots["tf"][0])
    rate = np.full(n_types, np.nan)
    rate[0] = rng.uniform(*_TF_RATE_FIRST)
    rate[1] = rng.uniform(*_TF_RATE_SECOND)
    rate[2:] = rng.uniform(*_TF_RATE_OTHER, size=n_types - 2)
    net.rates[tf] = rate
    direct = slots["direct"]
    n_rep = round(frac * len(direct))
    repressed = np.zeros(len(direct), dtype=bool)
    repressed[rng.choice(len(direct), size=n_rep, replace=False)] = True
    for g, rep in zip(direct, repressed, strict=True):
        net.edges.append((tf, int(g), strength(bool(rep))))
    _second_layer(rng, net, slots["indirect"], direct, signs, strength)
    net.programme[np.concatenate([direct, slots["indirect"]]).astype(int)] = tf

    # housekeeping master regulators without targets
    for g in slots["housekeeping"]:
        base = rng.uniform(*_RATE_HIGH)
        net.rates[int(g)] = base * rng.uniform(1 - _HK_JITTER, 1 + _HK_JITTER, n_types)

    # unrelated programmes: a master regulator each, targets in two layers
    rest = rng.permutation(slots["unrelated"])
    for module in np.array_split(rest, p["n_modules"]) if p["n_modules"] else []:
        mr, members = int(module[0]), module[1:]
        high = np.zeros(n_types, dtype=bool)
        while high.all() or not high.any():  # cell-type dependent: never one level in all types
            high = rng.random(n_types) < 0.5
        net.rates[mr] = np.where(high, rng.uniform(*_RATE_HIGH, n_types), rng.uniform(*_RATE_LOW, n_types))
        n_first = max(1, int(np.ceil(_FIRST_LEVEL * len(members))))
        first, second = members[:n_first], members[n_first:]
        for g, rep in zip(first, signs(len(first)), strict=True):
            net.edges.append((mr, int(g), strength(bool(rep))))
        _second_layer(rng, net, second, first, signs, strength)
        net.programme[module.astype(int)] = mr
    return net


def _second_layer(rng, net: _Network, targets: np.ndarray, parents: np.ndarray, signs, strength) -> None:
    """Each of ``targets`` regulated by one or two of ``parents``."""
    for g in targets:
        n_par = min(len(parents), int(rng.integers(1, 3)))
        chosen = rng.choice(parents, size=n_par, replace=False)
        for reg, rep in zip(chosen, signs(n_par), strict=True):
            net.edges.append((int(reg), int(g), strength(bool(rep))))


# ---- SERGIO -------------------------------------------------------------------------------------
def _import_sergio():
    try:
        from SERGIO import sergio
        from SERGIO.GRN import GRN, Gene, SingleInteraction
        from SERGIO.MR import mrProfile
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return sergio, GRN, Gene, SingleInteraction, mrProfile


def _sergio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    _import_sergio()
    try:
        return version("sergio-scsim")
    except PackageNotFoundError:  # importable from a source checkout
        return "unknown"


def _sergio_network(net: _Network, n_types: int):
    """Build the network from SERGIO objects (initialised: steady states, half-responses); return it and its edges."""
    _, GRN, Gene, SingleInteraction, mrProfile = _import_sergio()
    names = [str(g) for g in net.gene_ids]
    grn = GRN()
    genes = {}
    for reg, tar, k in net.edges:
        # one Gene object per name; GRN reuses the first object it saw for a name
        r = genes.setdefault(reg, Gene(name=names[reg], decay=_DECAY))
        t = genes.setdefault(tar, Gene(name=names[tar], decay=_DECAY))
        grn.add_interaction(SingleInteraction(reg=[r], tar=t, k=k, h=None, n=_HILL_N))
    for g in net.rates:  # master regulators without targets (housekeeping) are not in any interaction
        if g not in genes:
            genes[g] = grn._add_gene(Gene(name=names[g], decay=_DECAY))
    grn.setMRs()
    mrs = set(grn.get_mrs())
    expected = {names[g] for g in net.rates}
    if mrs != expected or len(grn.attr_["genes"]) != len(names):  # guard against SERGIO-side surprises
        raise RuntimeError(f"SERGIO network mismatch: {len(mrs)} master regulators, expected {len(expected)}.")
    profile = mrProfile(MR_names=sorted(mrs), n_types=n_types)
    for g, rate in net.rates.items():  # filled directly (mrProfile.build_from_file mangles integer names)
        profile.profile[names[g]] = np.asarray(rate, dtype=float)
    grn.init(profile, update_half_resp=True)
    index = {n: i for i, n in enumerate(names)}
    rows = [
        (index[i.reg_[0].name_], index[i.tar_.name_], float(i.k_), float(i.n_), float(i.h_))
        for i in grn.attr_["interactions"].values()
    ]
    edges = {
        "regulator": np.array([names[r[0]] for r in rows], dtype=str),
        "target": np.array([names[r[1]] for r in rows], dtype=str),
        "k": np.array([r[2] for r in rows]),
        "n": np.array([r[3] for r in rows]),
        "h": np.array([r[4] for r in rows]),
    }
    return grn, edges


@contextmanager
def _legacy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (SERGIO draws from it) and restore its state afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _simulate(grn, net: _Network, n_per_type: np.ndarray, p: dict, seed: int):
    """Noise-free expression with SERGIO's SDEs, then its technical noise; cells in random order."""
    sergio, *_ = _import_sergio()
    try:
        from SERGIO.Noise._noise import splatModel
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    from tqdm.auto import tqdm

    n_steps = p["safety_iter"] + int(n_per_type.max()) * p["scale_iter"]
    logger.info("SERGIO: simulating %d genes, %d cell types, %d steps", p["n_genes"], len(n_per_type), n_steps)
    with _legacy_seed(seed):
        sim = sergio(grn)
        step = sim._iter_ss
        with tqdm(total=n_steps, desc="SERGIO", unit="step", disable=not settings.progress) as bar:

            def counted(*args, **kwargs):
                step(*args, **kwargs)
                bar.update()

            sim._iter_ss = counted  # the same integration step, counted for the progress bar
            sim.simulate(
                nCells=n_per_type,
                noise_s=p["noise_s"],
                safety_iter=p["safety_iter"],
                scale_iter=p["scale_iter"],
                dt=p["dt"],
            )
        clean = sim.getSimExpr().loc[[str(g) for g in net.gene_ids]].to_numpy(dtype=float)  # genes x cells
        noise = splatModel()
        x = noise.outlier_effect(clean.copy(), outlier_prob=_OUTLIER_PROB, mean=_OUTLIER_MEAN, scale=_OUTLIER_SCALE)
        x = noise.lib_size_effect(x, mean=float(np.log(p["library_size"])), scale=_LIBRARY_SCALE)
        if p["dropout_percentile"] > 0:
            x = x * noise.dropout_indicator(x, shape=_DROPOUT_SHAPE, percentile=p["dropout_percentile"])
        counts = noise.convert_to_UMIcounts(x)
    cell_type = np.repeat(np.arange(len(n_per_type)), n_per_type)
    order = np.random.default_rng(seed).permutation(len(cell_type))
    return (
        np.ascontiguousarray(counts.T[order]).astype(np.int32),
        np.ascontiguousarray(clean.T[order]).astype(np.float32),
        cell_type[order].astype(np.int8),
    )


# ---- cache --------------------------------------------------------------------------------------
def _digest(params: dict, sergio_version: str) -> str:
    key = json.dumps({**params, "version": _VERSION, "sergio": sergio_version}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_cache(path: Path, n_cells: int, n_genes: int):
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            counts, expr, cell_type = z["counts"], z["expr"], z["cell_type"]
    except (OSError, ValueError, KeyError) as e:
        logger.warning("ignoring the unreadable SERGIO cache %s (%s); simulating again", path, e)
        return None
    if counts.shape != (n_cells, n_genes) or expr.shape != counts.shape or cell_type.shape != (n_cells,):
        logger.warning("ignoring the SERGIO cache %s: shape %s, expected %s", path, counts.shape, (n_cells, n_genes))
        return None
    return counts, expr, cell_type


def _write_cache(path: Path, counts: np.ndarray, expr: np.ndarray, cell_type: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(tmp, counts=counts, expr=expr, cell_type=cell_type)
        os.replace(tmp, path)
    except OSError as e:  # an unwritable cache only costs time
        logger.warning("could not write the SERGIO cache %s: %s", path, e)
        tmp.unlink(missing_ok=True)


# ---- arguments ----------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and np.isfinite(v)


def _validate(p: dict) -> None:
    for name in ("n_cells", "n_genes", "n_cell_types", "n_direct", "n_chromosomes", "gene_spacing", "scale_iter"):
        if not _is_int(p[name]) or p[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {p[name]!r}.")
    for name in ("n_indirect", "n_modules", "n_housekeeping", "safety_iter"):
        if not _is_int(p[name]) or p[name] < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {p[name]!r}.")
    if not _is_int(p["seed"]):
        raise ValueError(f"seed must be an integer, got {p['seed']!r}.")
    if not 2 <= p["n_cell_types"] <= len(CELL_TYPE_NAMES):
        raise ValueError(f"n_cell_types must be between 2 and {len(CELL_TYPE_NAMES)}, got {p['n_cell_types']!r}.")
    if p["n_cells"] < p["n_cell_types"]:
        raise ValueError(f"n_cells={p['n_cells']} is smaller than n_cell_types={p['n_cell_types']}.")
    planted = 1 + p["n_direct"] + p["n_indirect"] + p["n_housekeeping"]
    rest = p["n_genes"] - planted
    if rest < 2 * p["n_modules"] or (p["n_modules"] == 0 and rest != 0):
        need = planted + 2 * max(p["n_modules"], 1)
        raise ValueError(
            f"n_genes={p['n_genes']} does not fit the network: 1 TF + n_direct + n_indirect + n_housekeeping = "
            f"{planted} genes, and the remaining {rest} fill n_modules={p['n_modules']} programmes of at least 2 "
            f"genes each (a master regulator and a target); use n_genes >= {need}"
            + (" and n_modules >= 1." if p["n_modules"] == 0 else ".")
        )
    if p["gene_spacing"] < 1000:
        raise ValueError(f"gene_spacing must be at least 1000 bp, got {p['gene_spacing']!r}.")
    if p["n_chromosomes"] > p["n_genes"]:
        raise ValueError(f"n_chromosomes={p['n_chromosomes']} exceeds n_genes={p['n_genes']}.")
    if not _is_number(p["repressed_fraction"]) or not 0 <= p["repressed_fraction"] <= 1:
        raise ValueError(f"repressed_fraction must be between 0 and 1, got {p['repressed_fraction']!r}.")
    if not _is_number(p["library_size"]) or not p["library_size"] > 0:
        raise ValueError(f"library_size must be a positive number, got {p['library_size']!r}.")
    if not _is_number(p["dropout_percentile"]) or not 0 <= p["dropout_percentile"] < 100:
        raise ValueError(f"dropout_percentile must be in [0, 100), got {p['dropout_percentile']!r}.")
    if not _is_number(p["noise_s"]) or p["noise_s"] < 0:
        raise ValueError(f"noise_s must be a non-negative number, got {p['noise_s']!r}.")
    if not _is_number(p["dt"]) or not 0 < p["dt"] <= 0.2:
        raise ValueError(f"dt must be in (0, 0.2] (decay 0.8 per unit time), got {p['dt']!r}.")
    motif = p["tf_motif"]
    if not isinstance(motif, str) or not 6 <= len(motif) <= 30 or set(motif.upper()) - set("ACGT"):
        raise ValueError(f"tf_motif must be 6-30 bases of A/C/G/T, got {motif!r}.")
    if motif.upper() == _revcomp(motif.upper()):
        raise ValueError(f"tf_motif={motif!r} is its own reverse complement; choose a non-palindromic motif.")


def _normalised(p: dict) -> dict:
    """Plain Python values (a stable cache key, h5ad-writable ``uns``)."""
    out = {k: int(v) if _is_int(v) else v for k, v in p.items()}
    for k in ("repressed_fraction", "library_size", "dropout_percentile", "noise_s", "dt"):
        out[k] = float(p[k])
    out["tf_motif"] = p["tf_motif"].upper()
    return out

"""The ``sc-dta`` command line: the demo and the Bio-DTA pipeline on ``.h5ad`` files.

Every subcommand is a thin wrapper around the Python API (``sc-dta embed-dna`` calls
:func:`sc_dta.tl.embed_dna`, ...). User errors (missing or unreadable files, bad options, unknown genes) exit
with status 2 and a one-line message; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

PROG = "sc-dta"
#: Exceptions reported as a one-line user error (exit status 2) rather than a traceback.
USER_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class CLIError(Exception):
    """A user error with a message for the command line."""


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())  # one line


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} {str(p)!r} does not exist.")
    if p.is_dir():
        raise CLIError(f"{what} {str(p)!r} is a directory, expected a file.")
    return p


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} {str(p)!r} does not exist.")
    if not p.is_dir():
        raise CLIError(f"{what} {str(p)!r} is not a directory.")
    return p


def read_h5ad(path: str | os.PathLike) -> AnnData:
    """Read an ``.h5ad`` file or raise :class:`CLIError` naming it."""
    import anndata as ad

    p = _existing_file(path, "input file")
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # h5py raises OSError, anndata various errors for non-h5ad files
        raise CLIError(f"cannot read {str(p)!r} as an .h5ad file ({type(e).__name__}: {_message(e)}).") from e


def _check_output(path: str | os.PathLike) -> Path:
    """Return the output ``.h5ad`` path, or raise :class:`CLIError` before any work if it cannot be written."""
    p = Path(path).expanduser()
    if p.suffix != ".h5ad":
        raise CLIError(f"output file {str(p)!r} must end in .h5ad.")
    if not p.parent.exists():
        raise CLIError(f"output directory {str(p.parent)!r} does not exist.")
    return p


def write_h5ad(adata: AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` atomically (temporary file, then rename) so a failure never leaves half a file."""
    p = _check_output(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {p}", file=sys.stderr)
    return p


def _output(args: argparse.Namespace) -> Path:
    return Path(args.output) if args.output is not None else Path(args.input)


def _read_gene_list(path: str | os.PathLike) -> list[str]:
    """Gene ids or symbols, one per line (or comma separated); ``#`` starts a comment."""
    p = _existing_file(path, "target list")
    genes: list[str] = []
    for line in p.read_text().splitlines():
        line = line.split("#", 1)[0]
        genes.extend(g.strip() for g in line.replace(",", " ").replace("\t", " ").split(" ") if g.strip())
    if not genes:
        raise CLIError(f"target list {str(p)!r} holds no gene names.")
    return genes


def _parse_targets(specs: Sequence[str] | None) -> dict[str, list[str]] | None:
    """``NAME=FILE`` (or ``FILE``, named after its stem) → ``{name: genes}``."""
    if not specs:
        return None
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name:
            raise CLIError(f"--targets {spec!r}: expected NAME=FILE.")
        out[name] = _read_gene_list(path)
    return out


def _parse_cells(adata: AnnData, spec: str | None) -> Any:
    """``--cells KEY=VALUE[,VALUE...]`` → boolean mask over obs (None = all cells)."""
    if spec is None:
        return None
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise CLIError(f"--cells {spec!r}: expected OBS_KEY=VALUE[,VALUE...], e.g. cell_type=cardiomyocyte.")
    if key not in adata.obs.columns:
        raise CLIError(f"--cells: {key!r} is not a column of obs; columns: {', '.join(map(str, adata.obs.columns))}.")
    wanted = [v.strip() for v in values.split(",")]
    column = adata.obs[key].astype(str)
    mask = column.isin(wanted).to_numpy()
    if not mask.any():
        present = ", ".join(sorted(column.unique())[:20])
        raise CLIError(f"--cells {spec!r} selects no cells; values of obs[{key!r}] include: {present}.")
    return mask


def _load_model(path: str, *, device: str | None = None) -> Any:
    """Load a saved :class:`~sc_dta.models.BioDTA` directory, else a Geneformer checkpoint (name or path)."""
    from .models import BioDTA, load_geneformer

    p = Path(path).expanduser()
    if p.is_dir() and (p / "biodta_config.json").exists():
        return BioDTA.from_pretrained(p, device=device)
    if p.is_dir() and not (p / "config.json").exists():
        raise CLIError(f"--model {path!r} is neither a saved BioDTA (biodta_config.json) nor a checkpoint folder.")
    return load_geneformer(path, device=device)


def _set_device(args: argparse.Namespace) -> None:
    from ._settings import settings

    if getattr(args, "device", None) is not None:
        settings.device = args.device


# ----------------------------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta._demo.run_demo`."""
    from ._demo import run_demo

    _set_device(args)
    run_demo(
        args.out,
        seed=args.seed,
        encoder=args.encoder,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        umis_per_cell=args.umis_per_cell,
        epochs=args.epochs,
        n_controls=args.n_controls,
        device=args.device,
        threads=args.threads,
        verbose=True,
    )
    return 0


def cmd_annotate_tss(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.pp.annotate_tss`."""
    from .pp import annotate_tss

    gtf = _existing_file(args.gtf, "GTF file")
    adata = read_h5ad(args.input)
    annotate_tss(adata, gtf, gene_id_key=args.gene_id_key)
    n = int(adata.var["tss_pos"].notna().sum())
    print(f"TSS found for {n} of {adata.n_vars} genes", file=sys.stderr)
    write_h5ad(adata, _output(args))
    return 0


def cmd_embed_dna(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.tl.embed_dna`."""
    from ._demo import make_encoder
    from .genome import Genome
    from .tl import embed_dna

    fastas = [_existing_file(f, "FASTA file") for f in args.genome]
    adata = read_h5ad(args.input)
    _set_device(args)
    encoder = make_encoder(args.encoder, window=args.window, k=args.k, seed=args.seed, revision=args.revision)
    genome = Genome(fastas if len(fastas) > 1 else fastas[0])
    embed_dna(
        adata,
        genome=genome,
        encoder=encoder,
        key_added=args.key_added,
        batch_size=args.batch_size,
        device=args.device,
        cache=not args.no_cache,
    )
    write_h5ad(adata, _output(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Build (or load) a BioDTA model and run :func:`sc_dta.tl.train_adapter`; save it to ``--model-out``."""
    from .models import BioDTA
    from .tl import train_adapter

    adata = read_h5ad(args.input)
    _set_device(args)
    if args.dna_key not in adata.varm:
        raise CLIError(f"{args.input}: adata.varm has no {args.dna_key!r}; run `sc-dta embed-dna` first.")
    if args.model is not None:
        model = _load_model(args.model, device=args.device)
    else:
        overrides = {
            k: v
            for k, v in {"hidden_size": args.hidden_size, "n_layers": args.n_layers, "n_heads": args.n_heads}.items()
            if v is not None
        }
        model = BioDTA.from_adata(adata, dna_key=args.dna_key, seed=args.seed, **overrides)
    model = train_adapter(
        adata,
        model,
        dna_key=args.dna_key,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        freeze_backbone=args.freeze_backbone,
        layer=args.layer,
        seed=args.seed,
        device=args.device,
    )
    out = Path(args.model_out).expanduser()
    model.save_pretrained(out)
    gain = adata.uns["train_adapter"]["context_gain"]
    print(f"saved model to {out} (context gain {gain:.3f} nats per masked gene)", file=sys.stderr)
    return 0


def cmd_perturb_tss(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.tl.perturb_tss`."""
    from ._demo import make_encoder
    from .genome import Genome, read_vcf
    from .tl import perturb_tss

    fastas = [_existing_file(f, "FASTA file") for f in args.genome]
    adata = read_h5ad(args.input)
    _set_device(args)
    # each --mutation is its own result; the variants of a VCF are applied together (one haplotype)
    groups: list[Any] = list(args.mutation or [])
    if args.vcf is not None:
        variants = read_vcf(_existing_file(args.vcf, "VCF file"), sample=args.sample)
        if not variants:
            raise CLIError(
                f"--vcf {args.vcf!r} holds no variants" + (f" for sample {args.sample!r}." if args.sample else ".")
            )
        groups.append(variants[0] if len(variants) == 1 else variants)
    if not groups:
        raise CLIError("give at least one --mutation SPEC or a --vcf FILE.")
    model = _load_model(args.model, device=args.device)
    encoder = make_encoder(args.encoder, window=args.window, k=args.k, seed=args.seed, revision=args.revision)
    genome = Genome(fastas if len(fastas) > 1 else fastas[0])
    perturb_tss(
        adata,
        args.gene,
        groups[0] if len(groups) == 1 and not isinstance(groups[0], list) else groups,
        model=model,
        genome=genome,
        encoder=encoder,
        readout=args.readout,
        n_controls=args.n_controls,
        cells=_parse_cells(adata, args.cells),
        layer=args.layer,
        key_added=args.key_added,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
    )
    write_h5ad(adata, _output(args))
    return 0


def cmd_perturb_gene(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.tl.perturb_gene`."""
    from .tl import perturb_gene

    adata = read_h5ad(args.input)
    _set_device(args)
    model = _load_model(args.model, device=args.device)
    perturb_gene(
        adata,
        args.gene,
        model=model,
        kind=args.kind,
        readout=args.readout,
        cells=_parse_cells(adata, args.cells),
        layer=args.layer,
        key_added=args.key_added,
        batch_size=args.batch_size,
        device=args.device,
    )
    write_h5ad(adata, _output(args))
    return 0


#: File names read as VCF by ``sc-dta screen --perturbations`` (as is a file starting ``##fileformat=VCF``).
VCF_SUFFIXES = (".vcf", ".vcf.gz", ".vcf.bgz")
#: Perturbations that need no DNA (every other one is a TSS mutation through the encoder and adapter).
_TOKEN_PERTURBATIONS = ("delete", "overexpress")


def _read_perturbations(
    path: str | os.PathLike, *, gene_column: str, perturbation_column: str, sample: str | None
) -> list[Any]:
    """Read ``--perturbations``: VCF records, or ``(gene, perturbation)`` rows of a CSV/TSV table.

    A table's separator is a tab when its header line holds one, else a comma; ``#`` starts a comment. Several
    mutations in one cell separated by ``;`` are applied together (as ``screen`` writes them to ``obs``).
    """
    import pandas as pd

    from .genome import read_vcf

    p = _existing_file(path, "perturbations file")
    with open(p, "rb") as fh:
        start = fh.read(16)
    if p.name.lower().endswith(VCF_SUFFIXES) or start.startswith(b"##fileformat=VCF"):
        variants = read_vcf(p, sample=sample)
        if not variants:
            raise CLIError(
                f"perturbations file {str(p)!r} holds no variants" + (f" for sample {sample!r}." if sample else ".")
            )
        return variants
    if sample is not None:
        raise CLIError(f"--sample {sample!r} is for a VCF file; {str(p)!r} is read as a CSV/TSV table.")
    try:
        with open(p, encoding="utf-8") as fh:
            header = next((line for line in fh if line.strip() and not line.lstrip().startswith("#")), "")
        table = pd.read_csv(
            p, sep="\t" if "\t" in header else ",", dtype=str, comment="#", keep_default_na=False, skipinitialspace=True
        )
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise CLIError(
            f"cannot read perturbations file {str(p)!r} as CSV/TSV ({type(e).__name__}: {_message(e)})."
        ) from e
    table.columns = [str(c).strip() for c in table.columns]
    for column, option in ((gene_column, "--gene-column"), (perturbation_column, "--perturbation-column")):
        if column not in table.columns:
            raise CLIError(
                f"perturbations file {str(p)!r} has no column {column!r} (columns: {', '.join(table.columns)}); "
                f"name it with {option}."
            )
    rows: list[tuple[str, Any]] = []
    for line, (gene, perturbation) in enumerate(zip(table[gene_column], table[perturbation_column], strict=True)):
        gene, perturbation = gene.strip(), perturbation.strip()
        if not gene or not perturbation:
            raise CLIError(f"perturbations file {str(p)!r}: data row {line + 1} has an empty gene or perturbation.")
        parts = [m.strip() for m in perturbation.split(";") if m.strip()]
        rows.append((gene, parts[0] if len(parts) == 1 else parts))
    if not rows:
        raise CLIError(f"perturbations file {str(p)!r} holds no rows.")
    return rows


def _needs_dna(perturbations: Sequence[Any]) -> Any:
    """Return the first perturbation that goes through the DNA encoder (a TSS mutation or VCF record), or None."""
    for item in perturbations:
        if not isinstance(item, tuple) or item[1] not in _TOKEN_PERTURBATIONS:
            return item
    return None


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        if default is None:
            raise CLIError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {name} is not set; launch with torchrun.")
        return default
    try:
        return int(value)
    except ValueError:
        raise CLIError(f"environment variable {name}={value!r} is not an integer.") from None


def _world() -> tuple[int, int, int]:
    """``(world size, rank, local rank)`` from the environment ``torchrun`` sets (``(1, 0, 0)`` without it)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return 1, 0, 0
    return size, _env_int("RANK"), _env_int("LOCAL_RANK", 0)


class _Process:
    """One process of a ``torchrun`` launch: its rank, the world size and the compute device it uses."""

    def __init__(self, size: int, rank: int, device: str | None) -> None:
        self.size, self.rank, self.device = size, rank, device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _process_device(device: str | None, local_rank: int) -> tuple[str, str]:
    """Return the ``(backend, device)`` of one process of a group: NCCL on ``cuda:LOCAL_RANK``, else gloo."""
    import torch

    from ._utils import resolve_device

    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return "gloo", str(resolved)
    if resolved.index is not None and resolved.index != local_rank:
        raise CLIError(
            f"--device {device!r}: under torchrun each process uses cuda:LOCAL_RANK (here cuda:{local_rank}); "
            "give --device cuda or leave it out."
        )
    if local_rank >= torch.cuda.device_count():
        raise CLIError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s).")
    return "nccl", f"cuda:{local_rank}"


@contextlib.contextmanager
def _process_group(device: str | None) -> Iterator[_Process]:
    """Initialise the ``torch.distributed`` group of a ``torchrun`` launch (WORLD_SIZE > 1) and destroy it after.

    NCCL when the device is CUDA (each process on ``cuda:LOCAL_RANK``), else gloo. Only rank 0 logs below
    ERROR, shows warnings and draws progress bars. A group initialised by the caller is used as it is and left
    alone.
    """
    size, rank, local_rank = _world()
    if size <= 1:
        yield _Process(1, 0, device)
        return
    import torch
    import torch.distributed as dist

    from ._settings import settings

    if not dist.is_available():
        raise CLIError(f"WORLD_SIZE={size} but this torch build has no torch.distributed.")
    own = not dist.is_initialized()
    backend, device = _process_device(device, local_rank)
    if own:
        try:
            if backend == "nccl":
                torch.cuda.set_device(torch.device(device))
                dist.init_process_group("nccl", device_id=torch.device(device))
            else:
                dist.init_process_group("gloo")
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"cannot initialise the {backend} process group ({type(e).__name__}: {_message(e)}).") from e
    log = logging.getLogger("sc_dta")
    level, progress = log.level, settings.progress
    try:
        with warnings.catch_warnings():
            if rank != 0:  # the same warnings, log records and bars as rank 0's: shown once
                warnings.simplefilter("ignore")
                log.setLevel(logging.ERROR)
                settings.progress = False
            logger.info("process group: %s, %d processes, rank %d on %s", backend, size, rank, device)
            yield _Process(size, rank, device)
    finally:
        log.setLevel(level)
        settings.progress = progress
        if own and dist.is_initialized():
            dist.destroy_process_group()


def cmd_screen(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.tl.screen`; under ``torchrun`` the cells are sharded over the processes."""
    from .genome import Genome
    from .tl import screen

    out = _check_output(args.output)
    perturbations = _read_perturbations(
        args.perturbations,
        gene_column=args.gene_column,
        perturbation_column=args.perturbation_column,
        sample=args.sample,
    )
    dna = _needs_dna(perturbations)
    if dna is not None and not args.genome:
        what = f"the VCF record {dna}" if not isinstance(dna, tuple) else f"the TSS mutation {dna[1]!r} of {dna[0]!r}"
        raise CLIError(f"{what} needs --genome FASTA (and the --encoder used by embed-dna).")
    fastas = [_existing_file(f, "FASTA file") for f in args.genome or []]
    if args.checkpoint_dir is not None and Path(args.checkpoint_dir).expanduser().is_file():
        raise CLIError(f"--checkpoint-dir {args.checkpoint_dir!r} is a file, expected a directory.")
    adata = read_h5ad(args.input)
    cells = _parse_cells(adata, args.cells)
    _set_device(args)
    genome = encoder = None
    if dna is not None:
        from ._demo import make_encoder

        genome = Genome(fastas if len(fastas) > 1 else fastas[0])
        encoder = make_encoder(args.encoder, window=args.window, k=args.k, seed=args.seed, revision=args.revision)
    with _process_group(args.device) as proc:
        model = _load_model(args.model, device=proc.device)
        result = screen(
            adata,
            perturbations,
            model=model,
            genome=genome,
            encoder=encoder,
            layer=args.layer,
            cells=cells,
            groupby=args.groupby,
            readout=args.readout,
            per_cell=args.per_cell,
            checkpoint_dir=args.checkpoint_dir,
            batch_size=args.batch_size,
            device=proc.device,
            seed=args.seed,
            chunk_size=args.chunk_size,
            key_added=None,  # the input file is not rewritten: per-cell values go to the result with --per-cell
        )
        if proc.main:
            n_cells = int(result.obs["n_cells"].max()) if result.n_obs else 0
            print(
                f"screened {result.n_obs} perturbations × {result.n_vars} genes (up to {n_cells} cells each"
                + (f", {proc.size} processes)" if proc.size > 1 else ")"),
                file=sys.stderr,
            )
            write_h5ad(result, out)
    return 0


def _gene_symbols(value: str | None) -> str | None:
    """``--gene-symbols``: a var column, ``auto`` (detect one) or ``none`` (var names only)."""
    if value is None or value.strip().lower() in {"none", "off", "false", ""}:
        return None
    return "auto" if value.strip().lower() == "auto" else value


def _with_symbols(table: Any, adata: AnnData, gene_symbols: str | None) -> Any:
    """Insert a ``symbol`` column (first) into a table indexed by var names, when a symbol column is found."""
    from .pl._labels import gene_labels, symbol_column

    column = symbol_column(adata, gene_symbols)
    if column is None or "symbol" in table.columns:
        return table
    labels = gene_labels(adata, column)
    rows = adata.var_names.get_indexer(table.index)
    table = table.copy()
    table.insert(0, "symbol", [labels[r] if r >= 0 else name for r, name in zip(rows, table.index, strict=True)])
    return table


def cmd_rank(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.tl.rank_targets` and print the top genes and the metrics."""
    from .tl import rank_targets

    adata = read_h5ad(args.input)
    targets = _parse_targets(args.targets)
    table = rank_targets(
        adata, args.key, known_targets=targets, n_top=args.top_k, min_cells=args.min_cells, compare=args.compare or None
    )
    table = _with_symbols(table, adata, _gene_symbols(args.gene_symbols))
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        if args.show > 0:  # --show 0: no ranking rows (only the metrics, if any)
            print(table.head(args.show).to_string())
        metrics = table.attrs.get("metrics")
        if metrics:
            if args.show > 0:
                print()
            print(pd.DataFrame(metrics).T.to_string(float_format=lambda v: f"{v:.4g}"))
        if table.attrs.get("comparison"):
            print()
            print(pd.DataFrame(table.attrs["comparison"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv is not None:
        table.to_csv(args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.output is not None:
        write_h5ad(adata, args.output)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.pl.target_shift` and save the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from .pl import target_shift

    adata = read_h5ad(args.input)
    out = Path(args.output).expanduser()
    if not out.parent.exists():
        raise CLIError(f"output directory {str(out.parent)!r} does not exist.")
    targets = _parse_targets(args.targets)
    fig = target_shift(
        adata,
        args.key,
        compare=args.compare,
        highlight=targets,
        gene_symbols=_gene_symbols(args.gene_symbols),
        n_top=args.n_top,
        show=False,
        return_fig=True,
    )
    fig.savefig(out, dpi=args.dpi, bbox_inches="tight")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Run :func:`sc_dta.datasets.prefetch` (or list the registry)."""
    from .datasets import prefetch, registry

    if args.list or not (args.names or args.models):
        for name, entry in registry().items():
            kind = entry.get("kind", "")
            text = entry.get("description") or ", ".join(entry.get("members", []))
            print(f"{name:30s} {kind:6s} {' '.join(str(text).split())[:90]}")
        if not args.list:
            print("\nNothing downloaded: name entries or groups, e.g. `sc-dta prefetch default`.", file=sys.stderr)
        return 0
    paths = prefetch(
        args.names or None,
        models=args.models or None,
        cache_dir=args.cache_dir,
        hf_cache_dir=args.hf_cache_dir,
    )
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Append ``(default: X)`` to an option's help once: not when the help states its default, nor for flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional argument has no default to state
        return f"{text} (default: %(default)s)"


def _bounded(convert: type, minimum: float, *, strict: bool, what: str):
    """Build an argparse ``type=`` that converts with ``convert`` and refuses values below ``minimum`` (or at it, if strict)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (strict and not value > minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _bounded(int, 1, strict=False, what="a positive integer")
_nonneg_int = _bounded(int, 0, strict=False, what="a non-negative integer")
_positive_float = _bounded(float, 0.0, strict=True, what="a positive number")


def _add_io(p: argparse.ArgumentParser, *, output_required: bool = False, output_help: str = "output file") -> None:
    p.add_argument("input", help="input .h5ad file")
    p.add_argument(
        "-o",
        "--output",
        required=output_required,
        default=None,
        help="output .h5ad file (default: overwrite the input)" if not output_required else output_help,
    )


def _add_readout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--readout",
        choices=["expression", "cosine"],
        default="expression",
        help="expression: change of each gene's predicted presence (signed); cosine: Geneformer's embedding shift",
    )
    p.add_argument("--layer", default=None, help="layer with the raw counts (default: X)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="compute device: auto, cpu, cuda, cuda:1, mps (default: settings)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: settings)")


def _add_encoder(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DNA encoder (must match the one used by embed-dna)")
    g.add_argument(
        "--encoder",
        default="kmer",
        help="'kmer' (k-mer spectrum), 'enformer' (official weights, downloaded or cached), 'enformer-small' "
        "(small random-weight Enformer, for demos/tests), or a local Enformer weights directory",
    )
    g.add_argument("--window", type=_positive_int, default=None, help="window length in bp (default: the encoder's)")
    g.add_argument("--k", type=_positive_int, default=4, help="k-mer length for --encoder kmer")
    g.add_argument("--revision", default=None, help="pinned revision of the Enformer weights")
    g.add_argument("--seed", type=int, default=0, help="seed of the random-weight enformer-small")


def _add_global_options(p: argparse.ArgumentParser) -> None:
    """``-v``, ``-q`` and ``--debug`` after the command too (``sc-dta rank x.h5ad --debug``)."""
    g = p.add_argument_group("global options (also accepted before the command)")
    g.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0, help="more log messages")
    g.add_argument("-q", "--quiet", dest="sub_quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", dest="sub_debug", action="store_true", help="show full tracebacks for errors")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``sc-dta`` argument parser with all subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Dynamic token adaptation (Bio-DTA): DNA-aware single-cell foundation models, in-silico TSS "
        "mutation and target ranking on AnnData (.h5ad) files.",
        epilog="Run `sc-dta demo` for a 1.5-minute CPU demonstration on simulated data with a planted regulatory "
        "network. `sc-dta COMMAND --help` describes each command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages (-v info, -vv debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, description: str):
        p = sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    # demo
    p = add(
        "demo",
        cmd_demo,
        "simulate data with a planted GRN and run the whole method on the CPU",
        "Simulate cells from a gene regulatory network with a planted transcription factor (TF) and targets, "
        "annotate TSSs, embed DNA, build and train Bio-DTA from the cells (BioDTA.from_adata, train_adapter), "
        "delete the TF's promoter motifs in silico with matched control deletions (perturb-tss), compare with "
        "deleting and overexpressing the TF token (perturb-gene) and co-expression, and score every ranking "
        "against the planted targets. Writes a figure and the result .h5ad into --out.",
    )
    p.add_argument("--out", default="sc_dta_demo", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (simulation, model initialisation, training)")
    p.add_argument("--encoder", choices=["kmer", "motif", "enformer-small"], default="kmer", help="DNA encoder")
    p.add_argument("--n-cells", type=_positive_int, default=3000, help="number of simulated cells")
    p.add_argument("--n-genes", type=_positive_int, default=150, help="number of simulated genes")
    p.add_argument("--umis-per-cell", type=_positive_float, default=50.0, help="mean UMIs per simulated cell")
    p.add_argument("--n-controls", type=_positive_int, default=10, help="matched control deletions")
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs (default: train_adapter's budget)"
    )
    p.add_argument("--device", default=None, help="compute device (default: settings, i.e. auto)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch (the demo's small model runs fastest on one; results depend on this number)",
    )

    # annotate-tss
    p = add(
        "annotate-tss",
        cmd_annotate_tss,
        "add each gene's TSS (from a GTF) to var",
        "Write var['tss_chrom'], var['tss_pos'] (0-based) and var['tss_strand'] from the canonical transcript of "
        "each gene in a GTF/GTF.gz annotation (sc_dta.pp.annotate_tss). Genes are matched by Ensembl id "
        "(var_names or --gene-id-key), without version.",
    )
    _add_io(p)
    p.add_argument("--gtf", required=True, help="GTF or GTF.gz annotation (e.g. GENCODE)")
    p.add_argument("--gene-id-key", default=None, help="var column with Ensembl ids (default: var_names)")

    # embed-dna
    p = add(
        "embed-dna",
        cmd_embed_dna,
        "embed the DNA window around each gene's TSS into varm",
        "Cut the transcription-oriented window around each gene's TSS from the genome and embed it with a DNA "
        "encoder (sc_dta.tl.embed_dna); result in varm[--key-added]. Needs `sc-dta annotate-tss` first.",
    )
    _add_io(p)
    p.add_argument("--genome", required=True, nargs="+", help="genome FASTA file(s) (.fa, .fa.gz, per chromosome)")
    _add_encoder(p)
    p.add_argument("--key-added", default="dna_emb", help="varm/uns key")
    p.add_argument("--no-cache", action="store_true", help="do not use the on-disk embedding cache")
    _add_device(p)

    # train
    p = add(
        "train",
        cmd_train,
        "train a Bio-DTA model (adapter and optionally the cell model) by masked-gene modelling",
        "Train a BioDTA model on the cells (sc_dta.tl.train_adapter) and save it with save_pretrained. With "
        "--model, start from a Geneformer checkpoint or a saved BioDTA directory; otherwise build a small BioDTA "
        "from the cells with BioDTA.from_adata (the recipe of the demo and benchmarks/science.py).",
    )
    p.add_argument("input", help="input .h5ad file with raw counts and varm[--dna-key]")
    p.add_argument("--model-out", required=True, help="directory to save the trained model")
    p.add_argument("--model", default=None, help="Geneformer checkpoint (name or path) or BioDTA directory")
    p.add_argument("--dna-key", default="dna_emb", help="varm key of the DNA embeddings")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="training epochs (default: budget from the data, early stopping)",
    )
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="freeze the cell model and train only the adapter (default: frozen for a pretrained --model, "
        "trained for a model built from scratch)",
    )
    p.add_argument(
        "--hidden-size",
        type=_positive_int,
        default=None,
        help="hidden size of a model built from scratch (from_adata's)",
    )
    p.add_argument("--n-layers", type=_positive_int, default=None, help="layers of a model built from scratch")
    p.add_argument("--n-heads", type=_positive_int, default=None, help="attention heads of a model built from scratch")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--layer", default=None, help="layer with the raw counts (default: X)")
    _add_device(p)

    # perturb-tss
    p = add(
        "perturb-tss",
        cmd_perturb_tss,
        "mutate a gene's TSS in silico and record every gene's predicted response",
        "Replace the gene's token embedding by the adapter output for its mutated DNA window and record every "
        "other gene's response (sc_dta.tl.perturb_tss): the change of its predicted presence (--readout expression) "
        "or 1 - cos of its contextual embedding (--readout cosine), in layers[--key-added], with --n-controls "
        "matched control mutations. Mutations: 'chr8:11676959:C>T', 'delete:-100:+50' (relative to the TSS), "
        "'random:N' (or a VCF with --vcf).",
    )
    _add_io(p)
    p.add_argument("--model", required=True, help="trained BioDTA directory (from `sc-dta train`)")
    p.add_argument("--gene", required=True, help="gene to mutate (Ensembl id or symbol)")
    p.add_argument(
        "--mutation",
        action="append",
        help="mutation spec; repeat for several mutations, each then stored as its own result KEY_0, KEY_1, ...",
    )
    p.add_argument(
        "--vcf",
        default=None,
        help="VCF whose variants are applied together as one haplotype (stored as KEY_0 when it has several)",
    )
    p.add_argument("--sample", default=None, help="VCF sample whose alternative alleles are applied")
    p.add_argument("--genome", required=True, nargs="+", help="genome FASTA file(s)")
    p.add_argument("--cells", default=None, help="only cells with OBS_KEY=VALUE[,VALUE], e.g. cell_type=cardiomyocyte")
    p.add_argument("--key-added", default="dta_shift", help="layers/obs/var/uns key")
    p.add_argument(
        "--n-controls", type=_nonneg_int, default=10, help="matched control mutations (empirical p, specificity)"
    )
    _add_readout(p)
    _add_encoder(p)
    _add_device(p)

    # perturb-gene
    p = add(
        "perturb-gene",
        cmd_perturb_gene,
        "Geneformer-style in-silico deletion/overexpression of a gene token (baseline)",
        "Delete a gene's token from each cell (or move it to the front for --kind overexpress) and record "
        "every other gene's embedding shift (sc_dta.tl.perturb_gene).",
    )
    _add_io(p)
    p.add_argument("--model", required=True, help="BioDTA directory or Geneformer checkpoint (name or path)")
    p.add_argument("--gene", required=True, help="gene to perturb (Ensembl id or symbol)")
    p.add_argument("--kind", choices=["delete", "overexpress"], default="delete", help="perturbation")
    p.add_argument("--cells", default=None, help="only cells with OBS_KEY=VALUE[,VALUE]")
    p.add_argument(
        "--key-added", default=None, help="layers/obs/var/uns key (default: dta_shift_delete / dta_shift_overexpress)"
    )
    _add_readout(p)
    _add_device(p)
    # screen
    p = add(
        "screen",
        cmd_screen,
        "run many perturbations of many genes in one pass (a perturbations × genes .h5ad)",
        "Run every perturbation of a table or VCF on the cells (sc_dta.tl.screen) and write a perturbations × "
        "genes AnnData: X the mean shift over the evaluated cells, obs gene/perturbation/n_cells, layers n and, "
        "with --groupby, mean_GROUP. Each cell is tokenized once and its unperturbed forward is shared. "
        "--perturbations is a CSV/TSV with columns gene and perturbation ('delete', 'overexpress' or a mutation "
        "spec as for perturb-tss; several mutations joined by ';' are applied together), or a VCF (.vcf, "
        ".vcf.gz) whose records each become one row per gene whose TSS window contains them. Under torchrun "
        "(`torchrun --nproc-per-node N -m sc_dta screen ...`) the cells are sharded over the processes (NCCL on "
        "cuda:LOCAL_RANK, else gloo) and rank 0 writes the result.",
    )
    _add_io(p, output_required=True, output_help="result .h5ad file (perturbations × genes); the input is not changed")
    p.add_argument("--model", required=True, help="BioDTA directory or Geneformer checkpoint (name or path)")
    p.add_argument("--perturbations", required=True, help="CSV/TSV table (gene, perturbation) or a VCF file")
    p.add_argument("--gene-column", default="gene", help="column of the table with the genes (Ensembl id or symbol)")
    p.add_argument("--perturbation-column", default="perturbation", help="column of the table with the perturbations")
    p.add_argument("--sample", default=None, help="VCF sample: only the alternative alleles it carries")
    p.add_argument("--genome", nargs="+", default=None, help="genome FASTA file(s), needed for TSS mutations and VCFs")
    p.add_argument("--cells", default=None, help="only cells with OBS_KEY=VALUE[,VALUE]")
    p.add_argument("--groupby", default=None, help="obs column: also the mean shift within each of its groups")
    p.add_argument(
        "--per-cell",
        action="store_true",
        help="also store each cell's shifts (obsm['cell_shift'], uns['per_cell']); grows with the perturbations",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="directory for finished perturbations; rerunning the same command skips those done",
    )
    p.add_argument(
        "--chunk-size", type=_positive_int, default=32, help="perturbations evaluated together (share one forward)"
    )
    _add_readout(p)
    _add_encoder(p)
    _add_device(p)

    # rank
    p = add(
        "rank",
        cmd_rank,
        "rank genes by embedding shift and score known targets",
        "Rank genes by their mean embedding shift (sc_dta.tl.rank_targets) and, with --targets, score each target "
        "list (hits in the top k, AUROC, Mann-Whitney p).",
    )
    p.add_argument("input", help="input .h5ad file with a perturbation result")
    p.add_argument("--key", default="dta_shift", help="perturbation key (as --key-added of perturb-*)")
    p.add_argument(
        "--targets",
        action="append",
        help="NAME=FILE with gene ids/symbols one per line (repeat for several lists); FILE alone is named by its stem",
    )
    p.add_argument("--top-k", type=_positive_int, default=50, help="k for hits@k")
    p.add_argument("--min-cells", type=_positive_int, default=1, help="rank genes measured in at least this many cells")
    p.add_argument("--show", type=_nonneg_int, default=20, help="rows of the ranking to print (0: only the metrics)")
    p.add_argument(
        "--gene-symbols",
        default="auto",
        help="var column whose symbols are shown (and written to --csv) as a 'symbol' column; 'auto' takes the "
        "first of gene_symbol, gene_symbols, gene_name, feature_name; 'none' for var names only",
    )
    p.add_argument(
        "--compare",
        action="append",
        help="another result key scored on the same targets (repeat; e.g. dta_shift_delete, coexpression_GENE)",
    )
    p.add_argument("--csv", default=None, help="write the full ranking to this CSV file")
    p.add_argument("-o", "--output", default=None, help="also write the .h5ad with the ranking stored in uns")

    # plot
    p = add(
        "plot",
        cmd_plot,
        "plot the ranked target shifts to an image file",
        "Draw sc_dta.pl.target_shift for one or several perturbation keys and save it (format from the suffix).",
    )
    p.add_argument("input", help="input .h5ad file with a perturbation result")
    p.add_argument("-o", "--output", required=True, help="image file (.png, .pdf, .svg)")
    p.add_argument("--key", default="dta_shift", help="perturbation key")
    p.add_argument("--compare", default=None, help="second perturbation key drawn side by side, e.g. dta_shift_delete")
    p.add_argument(
        "--gene-symbols",
        default="auto",
        help="var column with the gene labels; 'auto' takes the first of gene_symbol, gene_symbols, gene_name, "
        "feature_name; 'none' for var names",
    )
    p.add_argument("--targets", action="append", help="NAME=FILE target lists to highlight")
    p.add_argument("--n-top", type=_positive_int, default=30, help="genes to show")
    p.add_argument("--dpi", type=_positive_int, default=150, help="resolution of raster images")

    # prefetch
    p = add(
        "prefetch",
        cmd_prefetch,
        "download weights, genome and annotation ahead of time (for offline clusters)",
        "Download registry entries (files via pooch, model repositories via huggingface_hub at pinned revisions) "
        "into the cache, so later runs work with HF_HUB_OFFLINE=1. Without names, list the registry; "
        "`sc-dta prefetch default` fetches hg38, GENCODE, the Geneformer V2 dictionaries, Enformer and Geneformer.",
    )
    p.add_argument("names", nargs="*", help="registry entries or groups (e.g. default, hg38, enformer)")
    p.add_argument("--model", dest="models", action="append", help="extra Hugging Face repo 'owner/name[@revision]'")
    p.add_argument("--list", action="store_true", help="list the registry entries and groups")
    p.add_argument("--cache-dir", default=None, help="data cache for files (default: settings.cache_dir)")
    p.add_argument("--hf-cache-dir", default=None, help="Hugging Face cache for model repositories")

    for p in sub.choices.values():
        _add_global_options(p)
    return parser


def _configure_logging(verbose: int) -> None:
    from ._settings import settings

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    settings.verbosity = level
    root = logging.getLogger("sc_dta")
    if not any(getattr(h, "_sc_dta_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._sc_dta_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)


#: Exit status after the reader of stdout went away (``sc-dta rank x.h5ad | head``), as for a process killed by
#: SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured, closed)
        pass


def _rank_tag() -> str:
    """`` (rank N)`` in the messages of the processes other than rank 0 of a ``torchrun`` launch, else ``""``."""
    try:
        size, rank, _ = _world()
    except CLIError:
        return ""
    return f" (rank {rank})" if size > 1 and rank != 0 else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sc-dta`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = (
        args.debug
        or getattr(args, "sub_debug", False)
        or os.environ.get("SC_DTA_DEBUG", "").lower() in {"1", "true", "yes"}
    )
    _configure_logging(args.verbose + getattr(args, "sub_verbose", 0))
    if args.quiet or getattr(args, "sub_quiet", False):
        from ._settings import settings

        settings.progress = False
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (CLIError, *USER_ERRORS) as e:
        if debug:
            raise
        print(f"{PROG} {args.command}{_rank_tag()}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}{_rank_tag()}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

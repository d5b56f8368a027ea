"""Benchmark DNA embedding: windows/s, peak memory and the overhead of ``tl.embed_dna`` over a bare Enformer forward.

For each model (a small Enformer and the official architecture with random weights) and window size it times

* ``bare``: ``model(one_hot, return_only_embeddings=True)`` on pre-built one-hot windows (the floor; the model is
  built with ``target_length=-1`` so that short windows are not cropped),
* ``encoder``: ``EnformerEncoder.embed`` on the window strings (one-hot on the fly, only the TSS bin through the
  final pointwise layer),
* ``embed_dna``: ``dta.tl.embed_dna`` on an AnnData whose genes' TSS windows are exactly those windows, from a
  FASTA on disk, with a cold on-disk cache (window extraction, hashing and cache writes included), and again
  with a warm cache.

Each step runs ``--repeats`` times, interleaved, and the best run counts (wall time and, separately, process CPU
time, which is less sensitive to other load on a shared machine). Overhead = embed_dna (cold) / bare - 1. Peak memory is the resident set size sampled every 2 ms above the level
before each step (psutil), plus ``ru_maxrss`` of the process; on CUDA the peak allocated GPU memory.

Examples
--------
    python benchmarks/embed_dna.py                       # CPU: small model and official architecture, 16k/32k bp
    python benchmarks/embed_dna.py --models small --sizes 16384 --n-small 16
    python benchmarks/embed_dna.py --device cuda          # adds the official 196,608 bp window in bf16
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch

import sc_dta as dta
from sc_dta._utils import autocast, resolve_device
from sc_dta.models.dna import EnformerEncoder, encode_bases

SMALL = {"dim": 192, "depth": 2, "heads": 4, "dim_divisible_by": 32}
OFFICIAL = {"dim": 1536, "depth": 11, "heads": 8}  # the enformer-pytorch defaults = official architecture


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (a sampling thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_genome(directory: Path, n: int, window: int, seed: int) -> tuple[Path, pd.DataFrame]:
    """One random chromosome holding ``n`` non-overlapping TSS windows, strands alternating."""
    rng = np.random.default_rng(seed)
    spacing = window + 1000
    length = (n + 1) * spacing
    seq = np.array(list("ACGT"))[rng.integers(0, 4, size=length)]
    fasta = directory / f"bench_{window}.fa"
    with open(fasta, "w") as fh:
        fh.write(">chrB\n")
        text = "".join(seq)
        for i in range(0, length, 80):
            fh.write(text[i : i + 80] + "\n")
    tss = pd.DataFrame(
        {
            "tss_chrom": ["chrB"] * n,
            "tss_pos": pd.array([(i + 1) * spacing for i in range(n)], dtype="Int64"),
            "tss_strand": ["+" if i % 2 == 0 else "-" for i in range(n)],
        },
        index=[f"gene{i}" for i in range(n)],
    )
    return fasta, tss


def bench(
    name: str, hparams: dict, window: int, n: int, batch_size: int, device: torch.device, workdir: Path, repeats: int
) -> dict:
    import anndata as ad
    from enformer_pytorch import Enformer

    torch.manual_seed(0)
    model = Enformer.from_hparams(target_length=-1, output_heads={"human": 8}, **hparams).eval().to(device)
    t0 = time.perf_counter()
    weights_hash = EnformerEncoder(model, window=window).weights_id
    hash_s = time.perf_counter() - t0
    encoder = EnformerEncoder(model, window=window, weights_id=f"bench-{name}")

    fasta, tss = synthetic_genome(workdir, n, window, seed=window)
    adata = ad.AnnData(X=np.zeros((2, n), dtype=np.float32), var=tss)
    genome = dta.genome.Genome(fasta)
    from sc_dta.tl._dna_cache import tss_window

    windows = [
        tss_window(genome, "chrB", int(p), s, encoder) for p, s in zip(tss["tss_pos"], tss["tss_strand"], strict=True)
    ]
    table = torch.cat([torch.eye(4), torch.zeros(1, 4)])
    one_hot = table[torch.from_numpy(encode_bases(windows)).long()]

    with torch.inference_mode(), autocast(device):  # warm-up (kernels, allocator)
        model(one_hot[:1].to(device), return_only_embeddings=True)
    sync(device)

    def bare() -> None:
        with torch.inference_mode(), autocast(device):
            for i in range(0, n, batch_size):
                model(one_hot[i : i + batch_size].to(device), return_only_embeddings=True).float().cpu()
        sync(device)

    from sc_dta.tl._dna_cache import DNAEmbeddingCache

    def embed_dna_cold() -> None:
        DNAEmbeddingCache(encoder, device=device).clear()
        dta.tl.embed_dna(adata, genome=genome, encoder=encoder, batch_size=batch_size, device=device)

    def embed_dna_warm() -> None:
        dta.tl.embed_dna(adata, genome=genome, encoder=encoder, batch_size=batch_size, device=device)

    results = {"model": name, "window": window, "n": n, "batch": batch_size, "device": str(device)}
    steps = [
        ("bare", bare),
        ("encoder", lambda: encoder.embed(windows, batch_size=batch_size, device=device)),
        ("embed_dna", embed_dna_cold),
        ("embed_dna_warm", embed_dna_warm),
    ]
    # Interleave the steps and keep the best of `repeats` runs: robust against other load on the machine.
    for _ in range(repeats):
        for label, fn in steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if dt < results.get(f"{label}_s", np.inf):
                results[f"{label}_s"] = dt
                results[f"{label}_win_s"] = n / dt
            results[f"{label}_cpu_s"] = min(cpu, results.get(f"{label}_cpu_s", np.inf))
            results[f"{label}_rss_mib"] = max(mem.delta_mib, results.get(f"{label}_rss_mib", 0.0))
            if device.type == "cuda":
                gpu = torch.cuda.max_memory_allocated() / 2**20
                results[f"{label}_gpu_mib"] = max(gpu, results.get(f"{label}_gpu_mib", 0.0))
    ref = encoder.embed(windows[:1], batch_size=1, device=device)
    assert np.allclose(adata.varm["dna_emb"][0], ref[0], rtol=1e-3, atol=1e-3), "embed_dna row differs from encoder"
    results["overhead_pct"] = 100 * (results["embed_dna_s"] / results["bare_s"] - 1)
    results["overhead_cpu_pct"] = 100 * (results["embed_dna_cpu_s"] / results["bare_cpu_s"] - 1)
    results["overhead_vs_encoder_pct"] = 100 * (results["embed_dna_s"] / results["encoder_s"] - 1)
    results["hash_weights_s"] = hash_s
    results["weights_hash"] = weights_hash[:19]
    results["maxrss_mib"] = maxrss_mib()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def report(r: dict) -> None:
    print(
        f"{r['model']:>8} {r['window']:>7} bp  n={r['n']:<3} batch={r['batch']:<2} {r['device']:<5} | "
        f"bare {r['bare_win_s']:8.2f} win/s | encoder {r['encoder_win_s']:8.2f} win/s | "
        f"embed_dna {r['embed_dna_win_s']:8.2f} win/s (cold), {r['embed_dna_warm_win_s']:9.1f} win/s (cached) | "
        f"overhead vs bare {r['overhead_pct']:+6.1f}% wall, {r['overhead_cpu_pct']:+6.1f}% CPU time "
        f"(vs encoder.embed {r['overhead_vs_encoder_pct']:+5.1f}%) | peak RSS +{r['bare_rss_mib']:.0f}/{r['encoder_rss_mib']:.0f}/"
        f"{r['embed_dna_rss_mib']:.0f} MiB (bare/encoder/embed_dna), maxrss {r['maxrss_mib']:.0f} MiB"
        + (
            f" | GPU peak {r['bare_gpu_mib']:.0f}/{r['encoder_gpu_mib']:.0f}/{r['embed_dna_gpu_mib']:.0f} MiB"
            if "bare_gpu_mib" in r
            else ""
        )
        + f" | weights sha256 {r['hash_weights_s']:.1f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "official"], choices=["small", "official"])
    p.add_argument("--sizes", nargs="+", type=int, default=[16_384, 32_768], help="window sizes in bp")
    p.add_argument("--n-small", type=int, default=16, help="windows for the small model")
    p.add_argument("--n-official", type=int, default=2, help="windows for the official architecture")
    p.add_argument("--batch-small", type=int, default=8)
    p.add_argument("--batch-official", type=int, default=1)
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto'")
    p.add_argument(
        "--full-window",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also the official 196,608 bp window (default: on when the device is CUDA)",
    )
    p.add_argument("--n-full", type=int, default=8)
    p.add_argument("--batch-full", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best run counts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dta.settings.progress = False
    full = device.type == "cuda" if args.full_window is None else args.full_window
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} CPU threads, dtype setting {dta.settings.dtype}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dta.settings.cache_dir = Path(tmp) / "cache"
        for model in args.models:
            hp = SMALL if model == "small" else OFFICIAL
            n = args.n_small if model == "small" else args.n_official
            batch = args.batch_small if model == "small" else args.batch_official
            for size in args.sizes:
                r = bench(model, hp, size, n, batch, device, Path(tmp), args.repeats)
                report(r)
                results.append(r)
        if full:
            r = bench("official", OFFICIAL, 196_608, args.n_full, args.batch_full, device, Path(tmp), args.repeats)
            report(r)
            results.append(r)
    return results


if __name__ == "__main__":
    main()

"""Benchmark ``tl.screen`` with 1 and with 2 processes on the CPU: cells/s and peak memory per process.

The same deletion screen (synthetic counts, a Geneformer vocabulary built from them, a random-weight
``BertForMaskedLM``; every process builds the identical inputs from the seed) is run under
``torchrun --standalone --nproc-per-node N`` for each N, each process on one thread (``OMP_NUM_THREADS=1``). With
N > 1 the processes form a gloo group and :func:`sc_dta.tl.screen` shards the cells over them. Reported per N:

- the screen's time (from a barrier before the call to the end of the slowest process) and the whole launch
  (``torchrun`` start-up, imports, building the inputs, the screen), as cells/s and cell-perturbations/s;
- each process's peak RSS (``ru_maxrss``) before and after the screen, and the sum over the processes;
- the largest difference of the result from the 1-process result (float32 rounding of other batches).

The machine is usually shared: the load average (``os.getloadavg``) before and after each run is printed, and
cells/s with 2 processes can only reach 2× when two cores are free.

Examples
--------
    python benchmarks/screen_processes.py                 # 300 cells, 10 deletions, 4 layers (~1-2 min, 2 cores)
    python benchmarks/screen_processes.py --cells 600 --procs 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _frequent_genes(a, vocab, k: int) -> list[str]:
    """The ``k`` genes present in most cells (so every deletion evaluates most cells)."""
    import sc_dta as dta

    tokens = dta.pp.tokenize(a, vocab=vocab)
    counts: dict[int, int] = {}
    special = set(vocab.special_ids)
    for ids in tokens.input_ids:
        for t in set(ids.tolist()) - special:
            counts[t] = counts.get(t, 0) + 1
    best = sorted(counts, key=lambda t: (-counts[t], t))[:k]
    return [vocab.id_to_token[t] for t in best]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: build the inputs, run the screen, report time and memory (rank 0 writes)."""
    import torch
    import torch.distributed as dist

    import sc_dta as dta

    torch.set_num_threads(1)
    dta.settings.progress = False
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        dist.init_process_group("gloo")
    try:
        from screen import build  # the synthetic cells and model of benchmarks/screen.py

        a, vocab, model = build(args.cells, args.genes, args.layers, args.hidden, args.max_length, args.seed)
        perts = [(g, "delete") for g in _frequent_genes(a, vocab, args.k)]
        before = _peak_rss_mib()
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        res = dta.tl.screen(
            a, perts, model=model, readout=args.readout, batch_size=args.batch_size, device="cpu", chunk_size=args.k
        )
        seconds = time.perf_counter() - t0
        mine = {"seconds": seconds, "rss_before_mib": before, "rss_peak_mib": _peak_rss_mib()}
        every = [None] * size
        if size > 1:
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        if res is not None:
            np.save(Path(args.result).with_suffix(".npy"), res.X)
            out = {
                "procs": size,
                "ranks": every,
                "n_cells": int(a.n_obs),
                "cell_perturbations": int(res.obs["n_cells"].sum()),
                "k": len(perts),
            }
            Path(args.result).write_text(json.dumps(out))
    finally:
        if size > 1:
            dist.destroy_process_group()


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def launch(procs: int, args: argparse.Namespace, directory: Path) -> dict:
    """Run one launch of ``procs`` processes; return its report with the wall time and the load averages."""
    result = directory / f"procs{procs}.json"
    options = ["--cells", args.cells, "--genes", args.genes, "--k", args.k, "--layers", args.layers]
    options += ["--hidden", args.hidden, "--max-length", args.max_length, "--seed", args.seed]
    options += ["--readout", args.readout, "--batch-size", args.batch_size]
    command = [*_torchrun(), "--standalone", "--nproc-per-node", str(procs), __file__, "--worker"]
    command += [*map(str, options), "--result", str(result)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{run.stderr[-4000:]}")
    report = json.loads(result.read_text())
    report |= {"wall": wall, "load_before": load_before, "load_after": os.getloadavg()}
    report["x"] = np.load(result.with_suffix(".npy"))
    return report


def _screen_seconds(report: dict) -> float:
    """The screen's time: the slowest process's (they start together after a barrier)."""
    return max(rank["seconds"] for rank in report["ranks"])


def main() -> None:
    """Run the launches and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=300, help="cells")
    p.add_argument("--genes", type=int, default=300, help="genes of the synthetic counts")
    p.add_argument("--k", type=int, default=10, help="deletions (the most frequent genes)")
    p.add_argument("--layers", type=int, default=4, help="BERT layers")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--max-length", type=int, default=128, help="tokens per cell")
    p.add_argument("--readout", choices=["cosine", "expression"], default="cosine", help="screen readout")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the counts and the weights")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--repeats", type=int, default=1, help="interleaved launches per process count (best is shown)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"screen: {args.cells} cells, {args.k} deletions, {args.layers} layers, hidden {args.hidden}, "
        f"{args.max_length} tokens, readout {args.readout}, batch {args.batch_size}; 1 thread per process; "
        f"{os.cpu_count()} CPUs; best of {args.repeats} interleaved launch(es)"
    )
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so that a change of the machine's load hits every N alike
            for n in args.procs:
                r = launch(n, args, Path(tmp))
                if n not in best or _screen_seconds(r) < _screen_seconds(best[n]):
                    best[n] = r
    reports = [best[n] for n in args.procs]
    base = reports[0]
    print(
        f"\n{'procs':>5} {'screen s':>9} {'cells/s':>8} {'cell-pert/s':>11} {'speed-up':>8} {'launch s':>8} "
        f"{'RSS/proc MiB (before→peak)':>28} {'RSS sum MiB':>11} {'max |ΔX|':>9} {'load before→after':>18}"
    )
    for r in reports:
        seconds = _screen_seconds(r)
        per = ", ".join(f"{rank['rss_before_mib']:.0f}→{rank['rss_peak_mib']:.0f}" for rank in r["ranks"])
        total = sum(rank["rss_peak_mib"] for rank in r["ranks"])
        base_seconds = _screen_seconds(base)
        with np.errstate(invalid="ignore"):
            diff = float(np.nanmax(np.abs(r["x"] - base["x"])))
        load = f"{r['load_before'][0]:.2f}→{r['load_after'][0]:.2f}"
        print(
            f"{r['procs']:>5} {seconds:>9.1f} {r['n_cells'] / seconds:>8.1f} {r['cell_perturbations'] / seconds:>11.1f} "
            f"{base_seconds / seconds:>7.2f}× {r['wall']:>8.1f} {per:>28} {total:>11.0f} {diff:>9.1e} {load:>18}"
        )
    print("\nload: 1-minute load average of the machine (os.getloadavg) before and after each launch")


if __name__ == "__main__":
    main()

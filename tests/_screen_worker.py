"""Worker of the 2-process tl.screen test (a module of its own so torch.multiprocessing.spawn can import it)."""

from __future__ import annotations

import os


def screen_worker(rank: int, world_size: int, store: str, out: str, kwargs: dict) -> None:
    """Run one rank of a gloo screen; rank 0 writes the result to ``out``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        from test_perturb import _build

        import sc_dta as dta

        a, vocab, model, tokens = _build("V2")
        perts = kwargs.pop("perturbations")
        res = dta.tl.screen(a, perts, model=model, device="cpu", **kwargs)
        if rank == 0:
            res.write_h5ad(out)
        else:
            assert res is None
    finally:
        dist.destroy_process_group()

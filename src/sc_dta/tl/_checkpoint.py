"""Training checkpoints: random states, weights and optimiser state, written atomically and read back exactly."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from sc_dta.models.biodta import BioDTA

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"


def get_rng_state(mask_gen: torch.Generator, cuda_devices: list) -> dict:
    """Python, numpy, torch (CPU and CUDA) and masking-generator states, as torch-serialisable values."""
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(d) for d in cuda_devices],
        "mask": mask_gen.get_state(),
    }


def set_rng_state(state: dict, mask_gen: torch.Generator, cuda_devices: list) -> None:
    """Restore the states saved by :func:`get_rng_state`."""
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    for d, s in zip(cuda_devices, state.get("cuda", []), strict=False):
        torch.cuda.set_rng_state(s, d)
    mask_gen.set_state(state["mask"])


def read_state(folder: Path | None) -> dict | None:
    """Read the trainer state of the checkpoint in ``folder`` (None when there is none)."""
    import torch

    if folder is None or not (folder / STATE_FILE).exists():
        return None
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def write_checkpoint(folder: Path, bio: BioDTA, payload: dict[str, Any]) -> None:
    """Write the model and ``payload`` (optimiser, scheduler, RNG, progress) to ``folder``, atomically."""
    import torch

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bio.save_pretrained(tmp / MODEL_DIR)
    torch.save(payload, tmp / STATE_FILE)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    logger.info("Checkpoint written to %s (epoch %d, step %d).", folder, payload["epoch"], payload["step"])


def load_checkpoint_weights(bio: BioDTA, folder: Path) -> None:
    """Load adapter, DNA table and (when saved) backbone weights of a checkpoint into ``bio``, in place."""
    from safetensors.torch import load_file

    from sc_dta.models.biodta import _BACKBONE_DIR, _WEIGHTS_FILE

    bio._load_adapter_tensors(load_file(str(folder / _WEIGHTS_FILE)))
    backbone_dir = folder / _BACKBONE_DIR
    if backbone_dir.exists():
        files = sorted(backbone_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"No backbone weights (*.safetensors) in {backbone_dir}.")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = bio.backbone.load_state_dict(state, strict=False)
        tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"Checkpoint backbone in {backbone_dir} does not match the model: missing {missing}, unexpected {unexpected}."
            )
    bio.to(bio.backbone.device)


def snapshot_weights(bio: BioDTA) -> dict[str, torch.Tensor]:
    """Copy to the CPU every parameter and buffer of ``bio`` (the best weights kept by early stopping)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in bio.state_dict().items()}


def restore_weights(bio: BioDTA, weights: dict[str, torch.Tensor]) -> None:
    """Load a :func:`snapshot_weights` copy back into ``bio``."""
    bio.load_state_dict(weights)

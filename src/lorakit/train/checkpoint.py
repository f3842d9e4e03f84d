"""Training checkpoints for exact resume: weights, optimizer, scheduler, RNG states and progress.

A checkpoint is one directory written atomically (temporary directory renamed over the previous one),
so a kill at any moment leaves either the previous checkpoint or the new one. Adapters are saved in
their raw form (an OLoRA/PiSSA adapter is resumed on the re-initialised base); everything else is
stored with torch.save and read back with `weights_only=True`, which can hold tensors and plain
Python values but never runs code.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.io import peft_format
from lorakit.io.atomic import atomic_directory
from lorakit.model import PeftModel

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
FULL_WEIGHTS_FILE = "trainable.safetensors"
OBJECTIVE_FILE = "objective.pt"


@dataclass
class Progress:
    """Where the run is: optimizer steps done, epoch and window within it, early-stopping state."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: Progress, objective_state: dict[str, Any] | None = None) -> None:
    """Write the full training state to `directory`, replacing any previous checkpoint atomically.

    `objective_state` is what the objective keeps across steps (`Objective.state_dict`)."""
    with atomic_directory(directory, overwrite=True) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp / "adapter", portable=False)
        else:
            trainable = {
                n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
            }
            save_file(trainable, str(tmp / FULL_WEIGHTS_FILE))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE
        )
        torch.save(rng_state(), tmp / RNG_FILE)
        torch.save(objective_state or {}, tmp / OBJECTIVE_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")


def saved_progress(directory: Path) -> Progress:
    """The progress recorded in the checkpoint in `directory`, without loading anything else."""
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise LorakitError(f"{directory}: no checkpoint to resume from (missing {STATE_FILE})")
    try:
        return Progress(**json.loads(state_file.read_text()))
    except (OSError, ValueError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise LorakitError(f"{state_file}: checkpoint cannot be resumed ({reason})") from None


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[Progress, dict[str, Any]]:
    """Restore what `save_checkpoint` wrote into freshly built model/optimizer/scheduler objects; returns
    the progress and the objective's saved state."""
    progress = saved_progress(directory)
    try:
        if isinstance(model, PeftModel):
            adapter_dir = directory / "adapter"
            saved = peft_format.read_adapter_weights(adapter_dir)
            name = model.active_adapter
            peft_format.load_adapter_tensors(
                model.get_base_model(), model.peft_config[name], name, saved, str(adapter_dir)
            )
        else:
            weights = load_file(str(directory / FULL_WEIGHTS_FILE))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in weights.items():
                    params[key].copy_(value)
        states = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        set_rng_state(torch.load(directory / RNG_FILE, map_location="cpu", weights_only=True))
        objective_state = torch.load(directory / OBJECTIVE_FILE, map_location="cpu", weights_only=True)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise LorakitError(
            f"{directory}: checkpoint cannot be resumed ({type(err).__name__}: {err})"
        ) from None
    return progress, objective_state

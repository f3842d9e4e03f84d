"""FSDP2 sharding for the Trainer (`--fsdp`): shard, save the best model, sharded checkpoints.

Each decoder layer (the classes a transformers model lists in `_no_split_modules`) and then the root
model become `fully_shard` units, as torchtune and axolotl shard LoRA models: the frozen base, the LoRA
factors (and DoRA magnitudes, modules_to_save copies) and therefore the AdamW state are split over the
processes along dim 0. In a unit's forward and backward its full parameters are all-gathered and freed
again after (`reshard_after_forward`); gradients are reduce-scattered, averaged over processes as DDP
averages them, so a sharded run takes the same steps as a data-parallel one.

Saving: the best adapter's tensors are gathered (`DTensor.full_tensor`, a collective every process calls
in the same order) and written once by the main process, in PEFT's format (portable for OLoRA/PiSSA, as
without sharding). A full fine-tune gathers the full state dict to the main process's CPU. Checkpoints
hold only the trainable parameters and the optimizer state, each process writing its own shard with
`torch.distributed.checkpoint` into one temporary directory that the main process renames into place
once every process has finished, so a crash (or `kill -9` of any process) leaves the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train.checkpoint import STATE_FILE, Progress, rng_state, saved_progress, set_rng_state
from lorakit.train.compile import decoder_layers
from lorakit.train.parallel import DataParallel

SHARDS_DIR = "shards"
SCHEDULER_FILE = "scheduler.pt"


class FullySharded(DataParallel):
    """FSDP2 over every process of the launch; see the module docstring."""

    sharded = True

    def setup(self, module: nn.Module) -> None:
        """Shard in place: each decoder layer of the trained model, then `module` (the Trainer's objective
        module, holding the model) as the root unit, so the loss and the evaluation, which call the
        embeddings, the decoder and the head separately, run inside the root's forward."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        model = module.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = decoder_layers(base)
        if not layers:
            raise LorakitError(
                f"--fsdp: {type(base).__name__} lists no decoder layer class (_no_split_modules) to shard by"
            )
        for layer in layers:
            fully_shard(layer)
        # The root too is resharded after each forward (FSDP2 keeps a root gathered by default): an
        # evaluation pass, which no backward follows, would otherwise leave it whole until the next step.
        fully_shard(module, reshard_after_forward=True)
        register_fsdp_forward_method(module, "evaluate")
        module.to(self.acc.device)  # each process's shards only
        self.root = module

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return module, optimizer

    def no_sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        # Gradients of the window's earlier micro-batches stay unsharded and accumulate locally; the last
        # backward reduce-scatters their sum once (FSDP2's equivalent of DDP's no_sync).
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def save_best(self, model: nn.Module, directory: Path, tokenizer: Any) -> None:
        from lorakit.io.atomic import atomic_directory

        if hasattr(model, "peft_config"):
            name = model.active_adapter
            tensors = gathered_adapter_tensors(model, name)
            if self.main:
                from lorakit.io.pretrained import save_adapters

                configs = {name: model.peft_config[name]}
                with atomic_directory(directory, overwrite=True) as tmp:
                    save_adapters(model.get_base_model(), configs, tmp, tensors={name: tensors})
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            with atomic_directory(directory, overwrite=True) as tmp:
                model.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)

    def save_checkpoint(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any,
                        progress: Progress, objective_state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        from lorakit.io.atomic import atomic_directory

        rank = dist.get_rank()
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_directory(directory, overwrite=True)) if self.main else None]
            dist.broadcast_object_list(tmp, src=0)
            dcp.save(_state(model, optimizer), checkpoint_id=tmp[0] / SHARDS_DIR)
            torch.save({"rng": rng_state(), "objective": objective_state}, tmp[0] / f"rank{rank}.pt")
            if self.main:
                torch.save(scheduler.state_dict(), tmp[0] / SCHEDULER_FILE)
                (tmp[0] / STATE_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
            # Every process has written its part before the main process renames the directory into place.
            dist.barrier()

    def load_checkpoint(self, directory: Path, model: nn.Module, optimizer: Any,
                        scheduler: Any) -> tuple[Progress, dict[str, Any]]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        rank = dist.get_rank()
        try:
            progress = saved_progress(directory)
            state = _state(model, optimizer)
            dcp.load(state, checkpoint_id=directory / SHARDS_DIR)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=_options(),
            )
            scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
            own = torch.load(directory / f"rank{rank}.pt", weights_only=True)
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise LorakitError(f"{directory}: sharded checkpoint cannot be resumed by process {rank} "
                               f"({type(err).__name__}: {err})") from None
        set_rng_state(own["rng"])
        return progress, own["objective"]


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what training changes: the frozen base is rebuilt from the model source on resume (so loading
    # is not strict about the frozen keys; `dcp.load` still fails on any trainable key the files lack).
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    return {"model": model_state, "optimizer": optimizer_state}


def gathered_adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under their PEFT names, whole and on the CPU. A collective:
    every process calls it (each tensor is all-gathered in turn, in the same order everywhere)."""
    from lorakit.io.peft_format import adapter_tensors

    tensors = adapter_tensors(model.get_base_model(), model.peft_config[adapter_name], adapter_name)
    return {
        key: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
        for key, t in tensors.items()
    }


def check_launch(world_size: int, config: Any) -> None:
    """Refuse what FSDP2 cannot do here, before any model loads; one line naming the option."""
    if world_size < 2:
        raise LorakitError(
            "--fsdp: shards the model over the processes of a launch (torchrun --nproc_per_node N, "
            "accelerate launch); this run has one process, so there is nothing to shard over"
        )
    if config.load_in_8bit:
        raise LorakitError("--fsdp with --load-in-8bit: bitsandbytes' int8 weights cannot be sharded (FSDP2 "
                           "shards floating-point parameters); use --load-in-4bit or no quantization")


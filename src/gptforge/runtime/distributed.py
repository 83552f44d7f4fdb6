"""Data-parallel training across processes: torchrun environment, DDP and FSDP2, state dicts.

The same ``gptforge train`` runs as one process or as N under ``torchrun --nproc-per-node N -m
gptforge train ...``. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; from them this module joins
the process group (NCCL on CUDA, gloo on CPU) and wraps the model:

- **DDP** keeps a full copy of the model on every rank and averages gradients during backward.
- **FSDP2** (``fully_shard``) shards parameters, gradients and optimizer state across ranks, one
  block at a time, gathering a block's weights just before it runs; memory per rank falls with N.

Checkpoints are keyed by parameter name, so a run saved on N processes resumes on M, and loads
for generation in a single process. They come in two forms (``train.ckpt_format``):

- *full*: every tensor gathered, unsharded, to rank 0, which writes the files alone;
- *sharded*: every rank writes its own part with ``torch.distributed.checkpoint`` (DCP), in
  parallel, and nothing is gathered; the ``.metadata`` file records where each piece of each
  tensor lies, so a reader with another world size (or none) takes the pieces it needs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gptforge.errors import GptforgeError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun with WORLD_SIZE > 1; else a no-op."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return info, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, precision) -> nn.Module:
    """The module to run: DDP-wrapped, or FSDP2-sharded in place (then ``model`` is returned)."""
    if not info.enabled:
        return model
    if strategy not in STRATEGIES:
        raise GptforgeError(f"runtime.parallel must be one of {', '.join(STRATEGIES)}, "
                            f"not '{strategy}'")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [precision.device.index] if precision.device.type == "cuda" else None
        # No buffer needs syncing (the RoPE tables are constants), and gradients that are views
        # into the all-reduce buckets save a copy of every gradient.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                       gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if precision.dtype != torch.float32:  # compute in low precision, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return all_reduce_sum(value, info) / info.world_size


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The sum of ``value`` over all ranks (every rank gets it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def min_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (every rank gets it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---- full state dicts keyed by parameter name ------------------------------------------------

def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (a collective under FSDP2: call it on every rank)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into a plain or FSDP2 model (on every rank)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state, strict=True)


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """``{"optimizers": [state keyed by parameter name, ...]}`` for one optimizer or a chain."""
    parts = getattr(optimizer, "optimizers", [optimizer])
    return {"optimizers": [_full_optimizer_state(model, opt) for opt in parts]}


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    parts = getattr(optimizer, "optimizers", [optimizer])
    if len(parts) != len(state["optimizers"]):
        raise GptforgeError("the checkpoint's optimizer does not match optim.name; "
                            "resume with the optimizer the run was started with")
    for opt, saved in zip(parts, state["optimizers"]):
        _load_full_optimizer_state(model, opt, saved)


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """One optimizer's state keyed by parameter name (``{"state": {name: ...}, ...}``)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = _param_names(model)
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for param, index in zip(group["params"], saved["params"]):
            index_to_name[index] = names[param]
    return {"state": {index_to_name[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]}
                             for g in sd["param_groups"]]}


def _load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                               state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    names = _param_names(model)
    name_to_index, index = {}, 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            name_to_index[names[param]] = index
            index += 1
    optimizer.load_state_dict({
        "state": {name_to_index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [name_to_index[n] for n in g["params"]]}
                         for g in state["param_groups"]]})


def _param_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter's name (the first one, for tied weights), as DCP state dicts name them."""
    names: dict[nn.Parameter, str] = {}
    for name, param in model.named_parameters():
        names.setdefault(param, name)
    return names


# ---- sharded state: each rank reads and writes its own part (DCP) --------------------------------
#
# Under FSDP2 the state dicts below hold DTensors: each rank's slice of every parameter and of its
# optimizer moments. ``dcp.save`` writes each rank's slices to its own file; replicated tensors
# (DDP, or one process) are written once, spread over the ranks. ``dcp.load`` fills the tensors it
# is given in place, reading whichever slices of the saved tensors they cover, so the world size
# and the sharding may differ between saving and loading.

def _flat_optimizer_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # One flat dict "state.<param>.<moment>" / "param_groups.<param>.<key>": several optimizers
    # (Muon + AdamW) over disjoint parameters merge into one without clashes.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp(action: str, state: dict, path) -> None:
    """``dcp.save`` or ``dcp.load`` of ``state`` at ``path``, quiet about running in one process
    (which is intended: DCP then reads or writes every piece itself)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        getattr(dcp, action)(state, checkpoint_id=str(path))


def _saved_names(path) -> dict:
    """Name -> metadata (``.size`` for tensors) of everything in the DCP checkpoint ``path``."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _model_state(model: nn.Module) -> dict:
    """The model's (possibly sharded) weights by name, a tied weight under its first name only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from gptforge.checkpoint import weights_to_save

    return weights_to_save(model, get_model_state_dict(model))


def save_sharded_model(model: nn.Module, path) -> None:
    """Write the model's weights as a DCP checkpoint at ``path`` (a collective)."""
    _dcp("save", _model_state(model), path)


def save_sharded_optimizer(model: nn.Module, optimizer, path) -> None:
    """Write the optimizer state (one optimizer or a chain) as a DCP checkpoint at ``path``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    parts = getattr(optimizer, "optimizers", [optimizer])
    _dcp("save", get_optimizer_state_dict(model, parts, options=_flat_optimizer_options()), path)


def load_sharded_model(model: nn.Module, path) -> None:
    """Fill the model's weights (plain or FSDP2-sharded) from the DCP checkpoint at ``path``.

    Every name of the model must be in the checkpoint with the same shape, and vice versa.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = _model_state(model)
    saved = _saved_names(path)
    missing, unexpected = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    wrong_shape = sorted(k for k in set(state) & set(saved)
                         if tuple(getattr(saved[k], "size", ())) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        detail = "; ".join(f"{what}: {names[:3]}" for what, names in
                           (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong_shape)) if names)
        raise GptforgeError(f"{path}: weights do not fit the model ({detail})")
    _dcp("load", state, path)
    # Tied aliases are absent from ``state``: loading their first name fills them too.
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def load_sharded_optimizer(model: nn.Module, optimizer, path) -> None:
    """Restore the optimizer state written by :func:`save_sharded_optimizer` (a collective).

    The optimizer's state is first created (one step with zero gradients and learning rate 0,
    which changes no weight), so that there are tensors of the right shapes to load into.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    parts = getattr(optimizer, "optimizers", [optimizer])
    options = _flat_optimizer_options()
    state = get_optimizer_state_dict(model, parts, options=options)
    if set(state) != set(_saved_names(path)):
        raise GptforgeError(f"{path}: the checkpoint's optimizer state does not match this run's "
                            "(different optim.name or trainable parameters); resume with the "
                            "settings the run was started with")
    _dcp("load", state, path)
    set_optimizer_state_dict(model, parts, state, options=options)

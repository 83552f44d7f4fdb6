"""Model and optimizer state keyed by parameter name, full or sharded, on any world size.

Checkpoints are keyed by parameter name, so a run saved on N processes resumes on M, and loads for
generation in a single process. The state comes in two forms (``train.ckpt_format``):

- *full*: every tensor gathered, unsharded, to rank 0 (a collective under FSDP2), which writes
  the files alone;
- *sharded*: every rank writes its own part with ``torch.distributed.checkpoint`` (DCP), in
  parallel, and nothing is gathered; the ``.metadata`` file records where each piece of each
  tensor lies, so a reader with another world size (or none) takes the pieces it needs.

Every function here works on a plain model in one process as well as on a DDP or FSDP2 one.
"""

from __future__ import annotations

import torch
from torch import nn

from gptforge.errors import GptforgeError
from gptforge.runtime.distributed import is_sharded


def tied_aliases(model: nn.Module) -> set[str]:
    """The second (third, ...) names of parameters shared under several names (tied weights)."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def weights_to_save(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second name of tied parameters (a tensor is stored once)."""
    aliases = tied_aliases(model)
    return {k: v for k, v in state.items() if k not in aliases}


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

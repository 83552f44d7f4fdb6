import copy

import pytest
import torch

from gptforge.checkpoints.state import full_optimizer_state, load_full_optimizer_state
from gptforge.config.loader import load_config
from gptforge.config.schema import OptimConfig
from gptforge.errors import GptforgeError
from gptforge.model import GPT, ModelConfig
from gptforge.model.loss import token_cross_entropy
from gptforge.train.optim import OptimizerChain, build_optimizer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=16, n_layer=2, n_head=2, n_embd=32, block_size=16))


def train(model, optimizer, steps=60):
    torch.manual_seed(1)
    pattern = torch.arange(16).repeat(4)[None, :17]  # a cycle the model can learn exactly
    losses = []
    for _ in range(steps):
        logits = model(pattern[:, :-1])
        loss = token_cross_entropy(logits, pattern[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, lr", [("adamw", 3e-3), ("muon", 3e-3), ("adafactor", 3e-2)])
def test_each_optimizer_learns(name, lr):
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=lr), torch.device("cpu"))
    losses = train(model, optimizer)
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(opt, OptimizerChain)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].startswith("blocks.") for i in muon_ids)
    assert id(model.tok_emb.weight) not in muon_ids
    everything = muon_ids | {id(p) for g in adamw.param_groups for p in g["params"]}
    assert everything == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_round_trip_by_name_continues_identically(name):
    """Saving optimizer state by parameter name and loading it into a fresh optimizer must
    continue exactly as the original (the basis of exact, world-size-independent resume)."""
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=3e-3), torch.device("cpu"))
    train(model, opt, steps=5)
    # A deep copy, as a checkpoint file gives: state_dict() shares the live moment tensors.
    state = copy.deepcopy(full_optimizer_state(model, opt))
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, OptimConfig(name=name, lr=3e-3), torch.device("cpu"))
    load_full_optimizer_state(twin, twin_opt, state)
    assert train(model, opt, steps=5) == train(twin, twin_opt, steps=5)


def test_wrong_optimizer_on_resume_and_unknown_name():
    model = tiny_model()
    adamw = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    muon = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    with pytest.raises(GptforgeError, match="does not match optim.name"):
        load_full_optimizer_state(model, muon, full_optimizer_state(model, adamw))
    with pytest.raises(GptforgeError, match="optim.name must be one of adamw, muon, adafactor"):
        load_config(None, ["optim.name=sgd"])


def test_muon_leaves_lora_adapters_to_adamw():
    from gptforge.model.lora import apply_lora

    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, dropout=0.0, targets=["qkv", "up"])
    # apply_lora froze every base matrix, so Muon has nothing to take: AdamW trains the adapters.
    adamw = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    adamw_names = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert adamw_names and all(".lora_" in n for n in adamw_names)

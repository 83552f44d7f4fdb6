import torch

from gptforge.model import GPT, ModelConfig
from gptforge.model.loss import token_cross_entropy
from gptforge.runtime.activation_checkpointing import apply_activation_checkpointing


def saved_activation_bytes(model, x, y):
    """Bytes of tensors autograd keeps for backward during one forward (a direct measurement)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = token_cross_entropy(model(x), y)
    return loss, total


def test_same_gradients_with_less_memory():
    cfg = ModelConfig(vocab_size=64, n_layer=4, n_head=4, n_embd=64, block_size=64, dropout=0.0)
    torch.manual_seed(0)
    plain = GPT(cfg)
    ckpt = GPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    x, y = torch.randint(0, 64, (4, 64)), torch.randint(0, 64, (4, 64))
    loss_a, bytes_a = saved_activation_bytes(plain, x, y)
    loss_b, bytes_b = saved_activation_bytes(ckpt, x, y)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert bytes_b < 0.5 * bytes_a
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # names unchanged


def test_eval_and_generation_paths_are_untouched():
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(cfg)
    apply_activation_checkpointing(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 64)

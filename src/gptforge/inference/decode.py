"""A compiled, static-shape decode step: the fast path for generating one token at a time.

At batch size 1 a decoding step multiplies every weight matrix by one vector, so its cost is
reading the weights once (memory-bound) plus the overhead of ~150 small operations. Eager PyTorch
does both poorly on a CPU: a one-row ``addmm`` reaches a fraction of the memory bandwidth, and
every operation costs microseconds of dispatch. This module compiles one decoding step with
``torch.compile`` into a single generated C++ function (docs/benchmarks.md has the measurements):

- **One graph, compiled once.** The position is a tensor, not a Python int, and the step attends
  over the preallocated KV cache up to the next multiple of 64 positions with a mask of the filled
  ones; that length is the graph's only dynamic dimension, so no step recompiles.
- **Matrix-vector products as reductions.** ``(W * x).sum(-1)`` becomes one vectorised loop that
  streams ``W`` at memory speed. Its input vector is materialised first (:func:`_materialize`),
  or Inductor would recompute the whole norm/residual expression for every output row.
- **Few inputs, no modules.** The weights are packed into two flat tensors (matrices; everything
  else) and the step takes views of them: each call checks ~16 tensors and a tuple of ints. Traced
  through the ``nn.Module`` tree with ~100 parameters, Dynamo's guards cost ~0.3-0.5 ms per call;
  now the call overhead is ~30 us.
- **Optional bf16 weights.** The matrices (and the KV cache) can be kept in bfloat16, half the
  bytes to stream, while activations and sums stay float32. Greedy output can then differ from
  the float32 model after some tokens (near-ties), so it is opt-in.

The prompt (prefill) is not compiled: it runs once through the model's own forward, which fills the
same :class:`KVCache`. The step is the model's forward for one token, built from the same
per-operation functions as the model's modules (``model/layers.py``: ``normalize``, ``apply_rope``,
``mlp_activation``; ``model/attention.py``: ``gate_heads``), so an architecture switch is written
once; only the matrix products and the attention over the cache are its own. Its tensors are looked
up by the model's parameter names and shapes (:func:`layout`), so a model it does not know fails
loudly at packing time, and the engine's tests compare it with the model token for token.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.inference.kv_cache import KVCache
from gptforge.model.attention import gate_heads
from gptforge.model.config import GATED_MLPS
from gptforge.model.layers import apply_rope, mlp_activation, normalize


class StepShape(NamedTuple):
    """The static facts of an architecture; the compiled step is specialised on them."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden: int
    padded_vocab: int
    block_size: int
    norm: str
    norm_eps: float
    mlp: str
    gelu_approximate: str
    bias: bool
    qk_norm: bool
    pos_emb: str
    logit_softcap: float
    attn_gate: str

    @classmethod
    def of(cls, model: nn.Module) -> StepShape:
        c = model.config
        return cls(c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.head_size, c.hidden_dim,
                   c.padded_vocab_size, c.block_size, c.norm, c.norm_eps, c.mlp,
                   c.gelu_approximate, c.bias, c.qk_norm, c.pos_emb, c.logit_softcap,
                   c.attn_gate)

    @property
    def gate_width(self) -> int:
        """Rows of the attention gate: one per head or per channel, 0 without a gate."""
        return {"head": self.n_head, "channel": self.n_head * self.head_dim}.get(self.attn_gate, 0)


def layout(s: StepShape) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
    """(name, shape) of the matrices and of the float32 tensors, in packing order.

    The names are the model's parameter/buffer names; the lm_head is listed among the matrices
    even when it is tied to the token embedding (which stays float32, for the lookup).
    """
    C, hs, A, G = s.n_embd, s.head_dim, s.n_head * s.head_dim, s.gate_width
    up_width = 2 * s.hidden if s.mlp in GATED_MLPS else s.hidden
    mats, vecs = [], [("tok_emb.weight", (s.padded_vocab, C))]
    vecs += {"rope": [("rope_cos", (s.block_size, hs // 2)), ("rope_sin", (s.block_size, hs // 2))],
             "sinusoidal": [("pos_table", (s.block_size, C))],
             "learned": [("pos_emb.weight", (s.block_size, C))]}[s.pos_emb]
    norm_bias = s.norm == "layernorm" and s.bias
    for i in range(s.n_layer):
        b = f"blocks.{i}."
        mats += [(b + "attn.qkv.weight", ((s.n_head + 2 * s.n_kv_head) * hs, C)),
                 (b + "attn.proj.weight", (C, A)), (b + "mlp.up.weight", (up_width, C)),
                 (b + "mlp.down.weight", (C, s.hidden))]
        if G:
            mats.append((b + "attn.gate.weight", (G, C)))
        vecs += [(b + "norm1.weight", (C,)), (b + "norm2.weight", (C,))]
        if norm_bias:
            vecs += [(b + "norm1.bias", (C,)), (b + "norm2.bias", (C,))]
        if s.qk_norm:
            vecs += [(b + "attn.q_norm.weight", (hs,)), (b + "attn.k_norm.weight", (hs,))]
        if s.bias:
            vecs += [(b + "attn.qkv.bias", ((s.n_head + 2 * s.n_kv_head) * hs,)),
                     (b + "attn.proj.bias", (C,)), (b + "mlp.up.bias", (up_width,)),
                     (b + "mlp.down.bias", (C,))]
            if G:
                vecs.append((b + "attn.gate.bias", (G,)))
    mats.append(("lm_head.weight", (s.padded_vocab, C)))
    vecs.append(("norm_f.weight", (C,)))
    if norm_bias:
        vecs.append(("norm_f.bias", (C,)))
    return mats, vecs


def pack(model: nn.Module, s: StepShape,
         weight_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the model's tensors: (matrices in ``weight_dtype``, the rest in float32), flat.

    Raises ValueError if the model's tensors do not match :func:`layout` (an unknown model).
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers())
    mats, vecs = layout(s)
    for name, shape in mats + vecs:
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise ValueError(f"the decode step expects {name} of shape {shape}")
    expected = {name for name, _ in mats + vecs}
    unknown = [n for n in tensors if n not in expected]
    if unknown:
        raise ValueError(f"the decode step does not know the model's {unknown[0]}")
    dtype = weight_dtype or tensors["lm_head.weight"].dtype
    flat_mats = torch.cat([tensors[n].detach().reshape(-1).to(dtype) for n, _ in mats])
    flat_vecs = torch.cat([tensors[n].detach().reshape(-1).float() for n, _ in vecs])
    return flat_mats, flat_vecs


def unpack(s: StepShape, mats: torch.Tensor, vecs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of the packed tensors by name (free: offsets are constants when traced)."""
    out = {}
    for flat, specs in zip((mats, vecs), layout(s)):
        offset = 0
        for name, shape in specs:
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
    return out


# ---- the step ----------------------------------------------------------------------------------

def _materialize(x: torch.Tensor) -> torch.Tensor:
    """The same tensor; under Inductor, forces it into a buffer (as_strided realises its input)."""
    return x.as_strided(x.shape, x.stride())


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in float32, for one row as a reduction that Inductor turns into one loop."""
    if x.numel() != x.size(-1):  # several rows: a real matrix product reads W only once
        y = F.linear(x, weight.float())
    else:
        y = (weight.float() * _materialize(x).unsqueeze(-2)).sum(-1)  # (.., out, in) -> (.., out)
    return y if bias is None else y + bias


def attend_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head (B, nh, hs) over the cache (B, nkv, L, hs) -> (B, nh, hs).

    Written as reductions rather than SDPA, whose CPU kernel is slow for a single query, so that
    Inductor fuses scores, masked softmax and weighted sum into a few loops.
    Query head h reads key/value head h // (nh / nkv), as SDPA's ``enable_gqa`` does.
    """
    B, nh, hs = q.shape
    nkv = k_cache.size(1)
    qg = q.view(B, nkv, nh // nkv, 1, hs)
    scores = (qg * k_cache.float().unsqueeze(2)).sum(-1) / math.sqrt(hs)  # (B, nkv, g, L)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    y = (probs.unsqueeze(-1) * v_cache.float().unsqueeze(2)).sum(-2)  # (B, nkv, g, hs)
    return y.reshape(B, nh, hs)


def _norm(s: StepShape, x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    return normalize(s.norm, x, p[name + ".weight"], p.get(name + ".bias"), s.norm_eps)


def _attention(s: StepShape, p: dict, b: str, x: torch.Tensor, rope, pos: torch.Tensor,
               visible: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    B, T, C = x.shape  # T == 1
    nh, nkv, hs = s.n_head, s.n_kv_head, s.head_dim
    qkv = matvec(x, p[b + "attn.qkv.weight"], p.get(b + "attn.qkv.bias"))
    q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    q = q.view(B, nh, 1, hs)  # with T == 1, (B, 1, nh, hs) -> (B, nh, 1, hs) is a plain view
    k = k.view(B, nkv, 1, hs)
    v = v.view(B, nkv, 1, hs)
    if s.qk_norm:
        q = normalize("rmsnorm", q, p[b + "attn.q_norm.weight"], None, s.norm_eps)
        k = normalize("rmsnorm", k, p[b + "attn.k_norm.weight"], None, s.norm_eps)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k_cache[:, :, pos] = k.to(k_cache.dtype)  # in place: the caches are inputs of the graph
    v_cache[:, :, pos] = v.to(v_cache.dtype)
    y = attend_one(q.view(B, nh, hs), k_cache, v_cache, visible)  # (B, nh, hs)
    if s.gate_width:
        y = gate_heads(y, matvec(x.view(B, C), p[b + "attn.gate.weight"],
                                 p.get(b + "attn.gate.bias")))
    return matvec(y.reshape(B, T, nh * hs), p[b + "attn.proj.weight"],
                  p.get(b + "attn.proj.bias"))


def _mlp(s: StepShape, p: dict, b: str, x: torch.Tensor) -> torch.Tensor:
    h = mlp_activation(s.mlp, matvec(x, p[b + "mlp.up.weight"], p.get(b + "mlp.up.bias")),
                       s.gelu_approximate)
    return matvec(h, p[b + "mlp.down.weight"], p.get(b + "mlp.down.bias"))


def decode_step(s: StepShape, mats: torch.Tensor, vecs: torch.Tensor, idx: torch.Tensor,
                pos: torch.Tensor, k_caches: list[torch.Tensor],
                v_caches: list[torch.Tensor]) -> torch.Tensor:
    """Float32 logits (B, padded_vocab) for tokens ``idx`` (B, 1) at position ``pos`` ((1,) long).

    Writes this position's keys and values into the per-layer caches (B, nkv, max_len, hs);
    positions after ``pos`` are masked out, whatever they hold.
    """
    p = unpack(s, mats, vecs)
    x = F.embedding(idx, p["tok_emb.weight"])  # (B, 1, C)
    rope = None
    if s.pos_emb == "rope":
        rope = (p["rope_cos"][pos], p["rope_sin"][pos])  # (1, hs/2) each
    else:
        x = x + F.embedding(pos, p["pos_table" if s.pos_emb == "sinusoidal" else "pos_emb.weight"])
    max_len = k_caches[0].size(2)
    visible = (torch.arange(max_len, device=idx.device) <= pos).view(1, max_len)
    for i in range(s.n_layer):
        b = f"blocks.{i}."
        x = x + _attention(s, p, b, _norm(s, x, p, b + "norm1"), rope, pos, visible,
                           k_caches[i], v_caches[i])
        x = x + _mlp(s, p, b, _norm(s, x, p, b + "norm2"))
    logits = matvec(_norm(s, x, p, "norm_f"), p["lm_head.weight"], None)[:, -1]
    if s.logit_softcap > 0:
        logits = s.logit_softcap * torch.tanh(logits / s.logit_softcap)
    return logits


_compiled_step = None


def compiled_step():
    """``torch.compile(decode_step)``, made once per process so compiled graphs are shared."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, dynamic=False, fullgraph=True)
    return _compiled_step


class CompiledDecoder:
    """Decodes one token per call with the compiled step.

    The weights are copied (packed) when the decoder is built, so later changes to the model are
    not seen: build a new decoder (a new ``Engine``) after training further. Errors from
    ``torch.compile`` surface on the first call; the engine falls back to the model on them.
    """

    attend_multiple = 64
    """The step attends over the cache up to the next multiple of this many positions, not over
    all of it: the length is a dynamic dimension of the one compiled graph."""

    def __init__(self, model: nn.Module, weight_dtype: torch.dtype | None = None,
                 compile: bool = True):
        self.shape = StepShape.of(model)
        self.mats, self.vecs = pack(model, self.shape, weight_dtype)
        self.fn = compiled_step() if compile else decode_step
        self.first_call_seconds: float | None = None
        self._views: tuple | None = None  # (cache, length, k views, v views)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Float32 logits (B, padded_vocab) for ``idx`` (B, 1) after the cache; advances it."""
        # A fresh contiguous idx: a strided view of a history buffer would fail the compiled
        # graph's stride guards and recompile it.
        idx = idx.clone(memory_format=torch.contiguous_format)
        pos = torch.tensor([cache.pos], device=idx.device)
        k_caches, v_caches = self._cache_views(cache)
        t0 = time.perf_counter()
        logits = self.fn(self.shape, self.mats, self.vecs, idx, pos, k_caches, v_caches)
        if self.first_call_seconds is None:  # includes compilation unless cached on disk
            self.first_call_seconds = time.perf_counter() - t0
        cache.advance(1)
        return logits

    def _cache_views(self, cache: KVCache) -> tuple[list, list]:
        """The caches cut to the attended length (views, rebuilt when the length grows)."""
        m = self.attend_multiple
        length = min(cache.max_len, (cache.pos + m) // m * m)  # covers position cache.pos
        if self._views is None or self._views[0] is not cache or self._views[1] != length:
            k = [t[:, :, :length] for t in cache.k]
            v = [t[:, :, :length] for t in cache.v]
            for t in k + v:  # one graph for every length, not one compilation each
                torch._dynamo.mark_dynamic(t, 2)
            self._views = (cache, length, k, v)
        return self._views[2], self._views[3]

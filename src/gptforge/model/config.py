"""Architecture hyper-parameters of a GPT, as plain data.

This dataclass is the ``[model]`` section of a run's config and the ``model.json`` stored in every
checkpoint, so a checkpoint always says exactly which network its weights belong to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POS_EMBS = ("learned", "rope", "sinusoidal")
GATED_MLPS = ("swiglu", "geglu", "reglu")
MLPS = ("gelu", "relu2", *GATED_MLPS)
ATTN_GATES = ("none", "head", "channel")
GELU_APPROXIMATIONS = ("tanh", "none")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0
    """Tokens in the vocabulary; 0 means "take it from the prepared data's tokenizer"."""
    pad_vocab_multiple: int = 64
    """Round the embedding and output rows up to a multiple of this (64 keeps matmuls aligned)."""
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Attention heads (query heads) per block; must divide ``n_embd`` unless ``head_dim`` is
    set."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means equal to ``n_head`` (plain
    multi-head)."""
    n_embd: int = 384
    """Width of the residual stream."""
    head_dim: int = 0
    """Width of each attention head; 0 means ``n_embd / n_head``. Set apart from it, attention
    works in ``n_head * head_dim`` channels and its output projection maps them back to
    ``n_embd`` (Qwen3: 16 heads of 128 with ``n_embd`` 1024)."""
    block_size: int = 256
    """Context length in tokens: the longest sequence the model is trained on and can attend
    over."""
    norm: str = "layernorm"
    """``layernorm`` (GPT-2) or ``rmsnorm`` (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon inside the normalisation."""
    pos_emb: str = "learned"
    """Positions: ``learned`` absolute embeddings (GPT-2), ``rope`` rotary embeddings (Llama) or
    ``sinusoidal`` fixed sine/cosine embeddings added to the tokens' (Vaswani et al., 2017; not
    learned, not saved)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (only for ``pos_emb = "rope"``)."""
    mlp: str = "gelu"
    """Feed-forward block: ``gelu`` (GPT-2), ``relu2`` (squared ReLU), or a gated linear unit
    (Shazeer, 2020): ``swiglu`` (Llama), ``geglu`` or ``reglu``."""
    gelu_approximate: str = "tanh"
    """GELU's form in the ``gelu`` and ``geglu`` MLPs: ``tanh``, the approximation GPT-2 was
    trained with (HF ``gelu_new``), or ``none``, the exact erf form (nanoGPT, BERT, HF ``gelu``).
    The same function to ~1e-3, but PyTorch's CPU kernel for ``tanh`` is ~4x slower than the exact
    one, so the presets trained from scratch use ``none`` (docs/benchmarks.md)."""
    mlp_hidden: int = 0
    """Hidden width of the MLP; 0 means 4*n_embd for gelu/relu2 and about 8/3*n_embd for the gated
    ones (swiglu, geglu, reglu)."""
    attn_gate: str = "none"
    """Sigmoid gate on the attention output before its projection, computed from the block's
    normed input (Qiu et al., 2025, "Gated Attention for Large Language Models"; Qwen3-Next):
    ``none``, ``head`` (one gate per head) or ``channel`` (one per channel)."""
    qk_norm: bool = False
    """Normalise queries and keys per head before attention (stabilises training at high lr)."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2 has them; Llama does not)."""
    tie_embeddings: bool = True
    """Share the token-embedding matrix with the output layer."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for large-data
    pretraining)."""
    logit_softcap: float = 0.0
    """If > 0, squash logits with ``cap * tanh(logits / cap)`` (Gemma-2, modded-nanogpt);
    0 = off."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    n_experts: int = 0
    """Experts per mixture-of-experts MLP; 0 means a dense MLP in every block (docs/moe.md)."""
    moe_top_k: int = 2
    """Experts each token is routed to (Mixtral: 2 of 8; Switch Transformer: 1)."""
    moe_expert_hidden: int = 0
    """Hidden width of each expert; 0 means the dense MLP's (``mlp_hidden`` or its default)."""
    moe_every: int = 1
    """An MoE MLP in every N-th block (the N-th, 2N-th, ...), dense MLPs in the others."""
    moe_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer) added to the training objective."""
    moe_z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE; 1e-3 there) that keeps router logits small; 0 = off."""

    def __post_init__(self) -> None:
        checks = [
            (self.n_layer > 0, "model.n_layer must be positive"),
            (self.n_head > 0 and (self.head_dim > 0 or self.n_embd % self.n_head == 0),
             f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head}), "
             "or set model.head_dim"),
            (self.head_dim >= 0, "model.head_dim must be >= 0 (0 = n_embd / n_head)"),
            (self.kv_heads > 0 and self.n_head % self.kv_heads == 0,
             f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head "
             f"({self.kv_heads})"),
            (self.block_size > 0, "model.block_size must be positive"),
            (self.norm in ("layernorm", "rmsnorm"), "model.norm must be 'layernorm' or 'rmsnorm'"),
            (self.pos_emb in POS_EMBS,
             f"model.pos_emb must be one of {', '.join(POS_EMBS)}, not {self.pos_emb!r}"),
            (self.mlp in MLPS, f"model.mlp must be one of {', '.join(MLPS)}, not {self.mlp!r}"),
            (self.gelu_approximate in GELU_APPROXIMATIONS,
             f"model.gelu_approximate must be one of {', '.join(GELU_APPROXIMATIONS)}, not "
             f"{self.gelu_approximate!r}"),
            (self.attn_gate in ATTN_GATES,
             f"model.attn_gate must be one of {', '.join(ATTN_GATES)}, not {self.attn_gate!r}"),
            (0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)"),
            (self.pos_emb != "rope" or self.head_size % 2 == 0,
             f"model.pos_emb=rope needs an even head size, not {self.head_size}"),
            (self.pos_emb != "sinusoidal" or self.n_embd % 2 == 0,
             "model.pos_emb=sinusoidal needs an even model.n_embd (sine and cosine pairs)"),
            (self.n_experts >= 0, "model.n_experts must be >= 0 (0 = dense MLP)"),
            (self.n_experts == 0 or 1 <= self.moe_top_k <= self.n_experts,
             f"model.moe_top_k ({self.moe_top_k}) must be between 1 and model.n_experts "
             f"({self.n_experts})"),
            (self.moe_expert_hidden >= 0, "model.moe_expert_hidden must be >= 0"),
            (self.moe_every >= 1, "model.moe_every must be >= 1"),
            (self.moe_aux_loss_coef >= 0 and self.moe_z_loss_coef >= 0,
             "model.moe_aux_loss_coef and model.moe_z_loss_coef must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Width of each attention head: ``head_dim``, or ``n_embd / n_head`` when it is 0."""
        return self.head_dim or self.n_embd // max(1, self.n_head)

    @property
    def attn_width(self) -> int:
        """Channels attention works in: ``n_head * head_size`` (``n_embd`` unless ``head_dim``
        sets the head size apart)."""
        return self.n_head * self.head_size

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is a gated linear unit (its up projection holds gate and value)."""
        return self.mlp in GATED_MLPS

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return (self.vocab_size + m - 1) // m * m

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.gated_mlp:  # keep parameters equal to a 4x GELU MLP, rounded to 64
            return (int(8 * self.n_embd / 3) + 63) // 64 * 64
        return 4 * self.n_embd

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (0-based) gets an MoE MLP: every ``moe_every``-th block.

        With ``moe_every = 2`` blocks 1, 3, 5, ... are MoE, so dense and MoE blocks alternate
        starting with a dense one, as in Switch Transformer and GShard.
        """
        return self.n_experts > 0 and (layer_idx + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

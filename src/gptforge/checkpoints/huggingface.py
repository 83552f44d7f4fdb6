"""The Hugging Face ``transformers`` layout: a gptforge model as GPT-2, Llama, Qwen3 or Mixtral.

A gptforge GPT is one class with switches (norm, positions, MLP, ...). Four settings of those
switches are exactly architectures that ``transformers`` implements, so a model trained with them
can be written as a ``transformers`` checkpoint directory and loaded with
``AutoModelForCausalLM.from_pretrained(DIR)``, no gptforge needed:

==========  ===========================================================================
``gpt2``    LayerNorm, learned positions, GELU (tanh approximation), full multi-head
            attention: ``GPT2LMHeadModel``
``llama``   RMSNorm, rotary positions (rotate-half pairing, as gptforge), SwiGLU,
            grouped-query attention allowed: ``LlamaForCausalLM``
``qwen3``   ``llama`` plus RMSNorm on each head's queries and keys before the rotation
            (``model.qk_norm``), and no biases: ``Qwen3ForCausalLM``
``mixtral`` ``llama`` with a mixture of SwiGLU experts in every block, top-k >= 2, no biases:
            ``MixtralForCausalLM``
==========  ===========================================================================

and ``qwen3_next``: ``qwen3`` with gated attention per channel (``model.attn_gate=channel``) is
``Qwen3NextForCausalLM`` with every layer full attention (none of its linear-attention layers)
and dense MLPs.

The Llama family's MLP may be any gated linear unit (SwiGLU, GEGLU, ReGLU: ``hidden_act`` silu,
gelu_pytorch_tanh, relu), and its heads may be wider or narrower than ``n_embd / n_head``
(``head_dim``). Anything else (squared-ReLU MLPs, logit soft-capping, top-1 routing, sinusoidal
positions, a gate per attention head, ...) has no matching ``transformers`` class, and
:func:`architecture_of` says which setting is in the way.

What changes between the two layouts is names and shapes, never values:

- gptforge keeps q, k and v in one matrix ``attn.qkv`` (rows: the n_head query heads, then the
  key heads, then the value heads); Llama/Qwen3 have three (``q_proj``, ``k_proj``, ``v_proj``);
  GPT-2 keeps one (``c_attn``) in the same row order.
- gptforge's SwiGLU ``mlp.up`` computes gate and value in one matrix (gate rows first); Llama has
  ``gate_proj`` and ``up_proj``.
- Qwen3-Next computes the attention gate in ``q_proj`` with the queries: per head, the head's
  query rows then its gate rows; gptforge has a separate ``attn.gate``. Its RMSNorms scale by
  ``1 + weight`` (weights stored minus one).
- GPT-2's linear layers are ``Conv1D`` modules, which store the weight as (in, out): the transpose
  of ``nn.Linear``'s (out, in).
- The embedding keeps gptforge's padded vocabulary (a multiple of 64 rows); the tokenizer's ids
  all come first, so the extra rows are never produced by it.

The tokenizer becomes ``tokenizer.json`` (the ``tokenizers`` library's format: byte-level BPE
already is one; a char vocabulary is written as a one-character-per-token word model), and the
chat template becomes a Jinja template in ``tokenizer_config.json`` for ``apply_chat_template``.
A tokenizer imported from this layout (``gptforge import``) is written back as its own files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig
from gptforge.tokenizer.base import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, load_tokenizer
from gptforge.tokenizer.chat_template import END_TOKEN, ROLE_TOKENS, ROLES, TEMPLATES

ARCHITECTURES = ("gpt2", "llama", "qwen3", "mixtral", "qwen3_next")

# transformers' ``hidden_act`` for the gate of each gated MLP (LlamaMLP: act(gate) * up); GELU's
# name depends on its form (``model.gelu_approximate``): GELU_ACTS.
HIDDEN_ACTS = {"swiglu": "silu", "reglu": "relu"}
GELU_ACTS = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}  # "gelu" is the exact erf form


def hidden_act(cfg: ModelConfig) -> str:
    """transformers' name of the MLP's nonlinearity (of the gate, in a gated MLP)."""
    if cfg.mlp in ("gelu", "geglu"):
        return GELU_ACTS[cfg.gelu_approximate]
    return HIDDEN_ACTS[cfg.mlp]

# The name tables of both directions (export here, import in ``hf_import.py``), per block.
# GPT-2: transformers name -> (gptforge name, width of a Conv1D's output or None for a norm).
# A Conv1D stores its weight as (in, out), the transpose of nn.Linear's.
GPT2_LAYER = {"ln_1": ("norm1", None), "ln_2": ("norm2", None),
              "attn.c_attn": ("attn.qkv", "qkv"), "attn.c_proj": ("attn.proj", "embd"),
              "mlp.c_fc": ("mlp.up", "hidden"), "mlp.c_proj": ("mlp.down", "embd")}
# Llama family: transformers name -> gptforge name, for tensors that keep their shape.
LLAMA_NORMS = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2"}
QK_NORMS = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
# gptforge's fused matrices and the transformers matrices they split into, in row order.
QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # of attn.qkv
GLU_PARTS = ("mlp.gate_proj", "mlp.up_proj")  # of mlp.up (gate rows first)
EXPERT_GLU_PARTS = ("w1", "w3")  # of mlp.experts.E.up in Mixtral's block_sparse_moe.experts.E
MIXTRAL_MOE = "block_sparse_moe."

# The chat template of tokenizer/chat_template.py in Jinja, the language of transformers'
# apply_chat_template: <|role|>content<|end|> per message, then <|assistant|> to generate.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in [" + ", ".join(f"'{r}'" for r in ROLES) + "] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; allowed: "
    + ", ".join(ROLES) + "') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_TOKEN + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ROLE_TOKENS["assistant"] + "' }}{%- endif -%}"
)


def architecture_of(cfg: ModelConfig) -> str:
    """The ``transformers`` architecture that computes exactly what ``cfg`` does, or an error
    naming the settings that no supported architecture has."""
    _refuse_unmatched_switches(cfg)
    rope_swiglu = [(cfg.norm == "rmsnorm", "model.norm=rmsnorm"),
                   (cfg.pos_emb == "rope", "model.pos_emb=rope"),
                   (cfg.gated_mlp, "model.mlp=swiglu, geglu or reglu")]
    dense = (cfg.n_experts == 0, "model.n_experts=0 (no mixture of experts)")
    ungated = (cfg.attn_gate == "none", "model.attn_gate=none")
    common = [(cfg.logit_softcap == 0, "model.logit_softcap=0")]
    wanted = {
        "gpt2": [dense, ungated, (cfg.norm == "layernorm", "model.norm=layernorm"),
                 (cfg.mlp == "gelu", "model.mlp=gelu"),
                 (cfg.attn_width == cfg.n_embd, "model.head_dim=0 (n_embd / n_head)"),
                 (cfg.pos_emb == "learned", "model.pos_emb=learned"),
                 (cfg.kv_heads == cfg.n_head, "model.n_kv_head=0 (no grouped-query attention)"),
                 (not cfg.qk_norm, "model.qk_norm=false")],
        "llama": [dense, ungated, *rope_swiglu, (not cfg.qk_norm, "model.qk_norm=false")],
        "qwen3": [dense, ungated, *rope_swiglu, (cfg.qk_norm, "model.qk_norm=true"),
                  (not cfg.bias, "model.bias=false")],
        # Mixtral renormalises the top-k router weights; gptforge does too for k >= 2 only
        # (with k = 1 it keeps the raw probability, as the Switch Transformer does).
        "mixtral": [ungated, *rope_swiglu, (cfg.n_experts > 0, "model.n_experts>0"),
                    (cfg.moe_every == 1, "model.moe_every=1 (experts in every block)"),
                    (cfg.moe_top_k >= 2, "model.moe_top_k>=2"),
                    (not cfg.qk_norm, "model.qk_norm=false"), (not cfg.bias, "model.bias=false")],
        "qwen3_next": [dense, *rope_swiglu, (cfg.attn_gate == "channel", "model.attn_gate=channel"),
                       (cfg.qk_norm, "model.qk_norm=true"), (not cfg.bias, "model.bias=false")],
    }
    missing = {}
    for arch, checks in wanted.items():
        missing[arch] = [need for ok, need in common + checks if not ok]
        if not missing[arch]:
            return arch
    fewest = min(len(needs) for needs in missing.values())
    closest = " or ".join(f"{arch} (needs {', '.join(needs)})"
                          for arch, needs in missing.items() if len(needs) == fewest)
    raise GptforgeError("this model has no Hugging Face transformers equivalent; the closest: "
                        f"{closest}")


def _refuse_unmatched_switches(cfg: ModelConfig) -> None:
    """One line for the switches that no ``transformers`` class has at all, with the reason."""
    if cfg.pos_emb == "sinusoidal":
        raise GptforgeError(
            "model.pos_emb=sinusoidal has no Hugging Face transformers equivalent: GPT-2 learns "
            "its position table and the Llama family rotates queries and keys; export with "
            "--format native")
    if cfg.attn_gate == "head":
        raise GptforgeError(
            "model.attn_gate=head has no Hugging Face transformers equivalent: Qwen3-Next, the "
            "only gated attention there, gates each channel; train with model.attn_gate=channel "
            "or export with --format native")


# ---- weights -------------------------------------------------------------------------------

def hf_state_dict(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under ``transformers`` names, contiguous, a tied output layer once."""
    cfg: ModelConfig = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = _gpt2_weights(sd, cfg) if arch == "gpt2" else _llama_weights(sd, cfg, arch)
    if arch == "qwen3_next":
        out = _qwen3_next_weights(out, sd, cfg)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _gpt2_weights(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    def bias_or_zeros(name: str, width: int) -> torch.Tensor:
        # GPT-2 always has biases; a model trained without them has zeros there.
        return sd.get(name, torch.zeros(width))

    C = cfg.n_embd
    out = {"transformer.wte.weight": sd["tok_emb.weight"],
           "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"],
           "transformer.ln_f.bias": bias_or_zeros("norm_f.bias", C)}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        widths = {None: None, "qkv": 3 * C, "embd": C, "hidden": cfg.hidden_dim}
        for hf_name, (name, conv_width) in GPT2_LAYER.items():
            width = widths[conv_width]
            weight = sd[ours + name + ".weight"]
            if width is not None:  # a Conv1D: (in, out)
                weight = weight.t()
            out[theirs + hf_name + ".weight"] = weight
            out[theirs + hf_name + ".bias"] = bias_or_zeros(ours + name + ".bias",
                                                            width or C)
    return out


def _llama_weights(sd: dict, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    q_rows = cfg.n_head * cfg.head_size
    kv_rows = cfg.kv_heads * cfg.head_size
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"],
           "model.norm.weight": sd["norm_f.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for hf_name, name in LLAMA_NORMS.items():
            out[f"{theirs}{hf_name}.weight"] = sd[f"{ours}{name}.weight"]
        for kind in ("weight", "bias"):
            qkv = sd.get(f"{ours}attn.qkv.{kind}")
            if qkv is None:
                continue
            for part, rows in zip(QKV_PARTS, qkv.split([q_rows, kv_rows, kv_rows])):
                out[f"{theirs}{part}.{kind}"] = rows
            out[f"{theirs}self_attn.o_proj.{kind}"] = sd[f"{ours}attn.proj.{kind}"]
            if arch == "mixtral":
                continue
            for part, rows in zip(GLU_PARTS, sd[f"{ours}mlp.up.{kind}"].chunk(2)):
                out[f"{theirs}{part}.{kind}"] = rows
            out[f"{theirs}mlp.down_proj.{kind}"] = sd[f"{ours}mlp.down.{kind}"]
        if arch == "mixtral":  # the per-expert layout every transformers version reads
            moe = theirs + MIXTRAL_MOE
            out[moe + "gate.weight"] = sd[f"{ours}mlp.router.weight"]
            for e in range(cfg.n_experts):
                halves = sd[f"{ours}mlp.experts.{e}.up.weight"].chunk(2)
                for part, rows in zip(EXPERT_GLU_PARTS, halves):
                    out[f"{moe}experts.{e}.{part}.weight"] = rows
                out[f"{moe}experts.{e}.w2.weight"] = sd[f"{ours}mlp.experts.{e}.down.weight"]
        if arch in ("qwen3", "qwen3_next"):
            for hf_name, name in QK_NORMS.items():
                out[f"{theirs}{hf_name}.weight"] = sd[f"{ours}{name}.weight"]
    return out


def _qwen3_next_weights(out: dict, sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen3 names turned into Qwen3-Next's: each head's gate rows after its query rows in
    ``q_proj``, and every RMSNorm weight minus one (Qwen3-Next scales by ``1 + weight``)."""
    nh, hs = cfg.n_head, cfg.head_size
    for i in range(cfg.n_layer):
        q_name = f"model.layers.{i}.self_attn.q_proj.weight"
        q = out[q_name].view(nh, hs, cfg.n_embd)
        gate = sd[f"blocks.{i}.attn.gate.weight"].view(nh, hs, cfg.n_embd)
        out[q_name] = torch.cat([q, gate], dim=1).reshape(2 * nh * hs, cfg.n_embd)
    return {k: v - 1 if k.endswith("norm.weight") else v
            for k, v in out.items()}


# ---- config.json ---------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, arch: str, specials: dict[str, int],
              expert_hidden: int = 0) -> dict:
    """``config.json`` for ``arch``: the sizes, and every setting that differs from its default."""
    eos, pad = specials[EOS_TOKEN], specials[PAD_TOKEN]
    common = {"vocab_size": cfg.padded_vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad,
              "initializer_range": cfg.init_std, "use_cache": True,
              "dtype": "float32", "torch_dtype": "float32"}  # the name since 5, and before
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_positions": cfg.block_size, "n_inner": cfg.hidden_dim,
                # GELU: "gelu_new" (GPT-2's own name for the tanh form) or "gelu" (exact).
                "activation_function": {"tanh": "gelu_new"}.get(cfg.gelu_approximate,
                                                                  hidden_act(cfg)),
                "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    llama = {"hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
             "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
             "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
             "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
             "hidden_act": hidden_act(cfg), "attention_bias": cfg.bias,
             "attention_dropout": 0.0,
             # transformers before 5 reads rope_theta, 5 and later rope_parameters.
             "rope_theta": cfg.rope_theta,
             "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, **llama,
                "mlp_bias": cfg.bias}
    if arch == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
                **llama, "intermediate_size": expert_hidden,
                "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.moe_top_k,
                "router_aux_loss_coef": cfg.moe_aux_loss_coef, "output_router_logits": False,
                "router_jitter_noise": 0.0, "sliding_window": None}
    if arch == "qwen3_next":  # full attention and a dense MLP in every layer
        rope = {**llama["rope_parameters"], "partial_rotary_factor": 1.0}
        return {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **common,
                **llama, "rope_parameters": rope, "partial_rotary_factor": 1.0,
                "layer_types": ["full_attention"] * cfg.n_layer, "num_experts": 0,
                "mlp_only_layers": list(range(cfg.n_layer))}
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **common, **llama,
            "use_sliding_window": False}


# ---- tokenizer -----------------------------------------------------------------------------

def jinja_chat_template(name: str) -> str:
    """The Jinja of the named chat template a checkpoint was fine-tuned with (model.json)."""
    template = TEMPLATES.get(name)
    return template.jinja() if hasattr(template, "jinja") else CHAT_TEMPLATE


def write_tokenizer(tokenizer_dir: Path, out: Path, block_size: int,
                    template: str = "gptforge") -> dict[str, int]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in ``out``;
    returns the special tokens' ids. ``template``: the chat template's name."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.kind == "hf":  # imported from this layout: its own files, unchanged
        for name, data in tokenizer.files.items():
            (out / name).write_bytes(data)
        return tokenizer.special_tokens
    if tokenizer.kind == "bpe":
        shutil.copyfile(Path(tokenizer_dir) / tokenizer.file_name, out / "tokenizer.json")
    elif tokenizer.kind == "char":
        char_tokenizer_json(tokenizer).save(str(out / "tokenizer.json"))
    else:
        raise GptforgeError(
            "the Hugging Face export writes tokenizer.json, which a SentencePiece tokenizer "
            "does not convert to exactly; export with --format native, or train the model "
            "with --tokenizer bpe")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
               "additional_special_tokens": [t for t in SPECIAL_TOKENS
                                             if t not in (EOS_TOKEN, PAD_TOKEN)]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "model_max_length": block_size, "clean_up_tokenization_spaces": False,
              "chat_template": jinja_chat_template(template)}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tokenizer.special_tokens


def char_tokenizer_json(tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes and decodes exactly as the char tokenizer: a
    word-level model whose words are single characters, after splitting the text into them."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {text: i for i, text in enumerate(tokenizer._id_to_text)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    # Any one character (line breaks too) is a piece of its own.
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()  # join the pieces with nothing between them
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in SPECIAL_TOKENS])
    return hf


# ---- the exporter --------------------------------------------------------------------------

def write_huggingface(model: torch.nn.Module, meta: dict, source: Path, out: Path) -> None:
    """A ``transformers`` checkpoint directory of ``model`` (from checkpoint ``source``) in
    ``out``: config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    arch = architecture_of(cfg)
    specials = write_tokenizer(source / "tokenizer", out, cfg.block_size,
                               meta.get("chat_template", "gptforge"))
    save_file(hf_state_dict(model, arch), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    expert_hidden = model.blocks[0].mlp.experts[0].down.in_features if cfg.n_experts else 0
    config = hf_config(cfg, arch, specials, expert_hidden)
    config["gptforge"] = {"exported_from": str(source.resolve()), "step": meta.get("step"),
                          "model": cfg.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": specials[EOS_TOKEN], "pad_token_id": specials[PAD_TOKEN],
                  # a chat turn ends with <|end|>, a document with <|endoftext|>
                  "eos_token_id": [i for i in (specials.get(END_TOKEN), specials[EOS_TOKEN])
                                   if i is not None]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

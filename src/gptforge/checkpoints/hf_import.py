"""Importing a Hugging Face ``transformers`` checkpoint directory as a gptforge checkpoint.

The inverse of ``huggingface.py`` (whose name tables it shares): a GPT-2, Llama, Qwen3 or
Mixtral directory (``config.json``, weights as ``model.safetensors``, sharded
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, or
``pytorch_model.bin`` read with ``torch.load(weights_only=True)``, so no pickled code runs) and its
tokenizer (``tokenizer.json`` with ``tokenizer_config.json``, kept with its ids as a foreign
tokenizer) become a checkpoint directory that ``generate``, ``chat``, ``eval`` and ``init_from``
read like any other.

``config.json`` maps onto a :class:`ModelConfig`; anything gptforge cannot compute exactly
(``rope_scaling``, a sliding window shorter than the context, exact-erf GELU, top-1 Mixtral
routing, ...) is refused with the setting's name rather than imported approximately. The
vocabulary keeps the checkpoint's row count (``pad_vocab_multiple = 1``): no padding rows are added,
so the logits are the checkpoint's, row for row. Weights become float32, as gptforge trains in.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch

from gptforge import atomic
from gptforge.checkpoints.format import FORMAT_VERSION, read_safetensors
from gptforge.checkpoints.huggingface import (
    EXPERT_GLU_PARTS,
    GLU_PARTS,
    GPT2_LAYER,
    HIDDEN_ACTS,
    LLAMA_NORMS,
    MIXTRAL_MOE,
    QK_NORMS,
    QKV_PARTS,
)
from gptforge.checkpoints.state import weights_to_save
from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT

log = logging.getLogger(__name__)

MODEL_TYPES = ("gpt2", "llama", "qwen3", "mixtral")
# transformers' activation name -> GELU's form (model.gelu_approximate); "gelu" is exact (erf).
GELU_FORMS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# transformers' hidden_act of a gated MLP -> (gptforge's MLP, GELU's form where it has one).
GATED_ACTS = {**{act: (mlp, "tanh") for mlp, act in HIDDEN_ACTS.items()},
              **{act: ("geglu", form) for act, form in GELU_FORMS.items()}}
# Buffers old GPT-2 checkpoints saved with the weights (the causal mask): not weights.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def is_huggingface_dir(path: str | Path) -> bool:
    """Whether ``path`` is a transformers checkpoint directory (not a gptforge one)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "model.json").is_file()


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptforgeError(f"{path}: cannot read ({err})") from None
    if not isinstance(config, dict):
        raise GptforgeError(f"{path}: not a JSON object")
    return config


# ---- config.json -> ModelConfig ------------------------------------------------------------

def model_config_from_hf(config: dict, source: str, block_size: int = 0) -> tuple[str, ModelConfig]:
    """(model_type, the gptforge config computing what ``config`` describes); ``block_size`` > 0
    caps the context (``max_position_embeddings`` is often far longer than one trains on)."""
    arch = config.get("model_type")
    if arch not in MODEL_TYPES:
        raise GptforgeError(f"{source}/config.json: model_type {arch!r} cannot be imported; "
                            f"gptforge imports {', '.join(MODEL_TYPES)}")
    fields = _gpt2_fields(config, source) if arch == "gpt2" else _llama_fields(config, arch, source)
    if block_size > 0:
        fields["block_size"] = min(block_size, fields["block_size"])
    fields.update(vocab_size=_required(config, "vocab_size", source), pad_vocab_multiple=1,
                  init_std=float(config.get("initializer_range", 0.02)), dropout=0.0)
    try:
        cfg = ModelConfig(**fields)
    except ValueError as err:
        raise GptforgeError(f"{source}/config.json: {err}") from None
    # Sizes left at gptforge's defaults are written as 0 ("the default"), as a gptforge run has.
    defaults = {"mlp_hidden": ModelConfig(**{**fields, "mlp_hidden": 0}).hidden_dim,
                "n_kv_head": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head}
    implicit = {k: 0 for k, v in defaults.items() if fields.get(k) == v}
    return arch, ModelConfig(**{**fields, **implicit})


def _required(config: dict, key: str, source: str):
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GptforgeError(f"{source}/config.json: {key} must be a positive integer, "
                            f"not {value!r}")
    return value


def _refuse(source: str, setting: str, why: str) -> GptforgeError:
    return GptforgeError(f"{source}/config.json: {setting} cannot be imported: {why}")


def _gpt2_fields(config: dict, source: str) -> dict:
    act = config.get("activation_function", "gelu_new")
    if act not in GELU_FORMS:
        raise _refuse(source, f"activation_function={act}", "gptforge's GPT-2 MLP is a GELU "
                      f"({', '.join(GELU_FORMS)})")
    for key, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if config.get(key, wanted) != wanted:
            raise _refuse(source, f"{key}={config[key]}", "gptforge's attention has no such "
                          "variant")
    C = _required(config, "n_embd", source)
    return dict(n_layer=_required(config, "n_layer", source), n_head=_required(config, "n_head",
                source), n_embd=C, block_size=_required(config, "n_positions", source),
                norm="layernorm", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
                pos_emb="learned", mlp="gelu", gelu_approximate=GELU_FORMS[act],
                mlp_hidden=config.get("n_inner") or 4 * C,
                bias=True, tie_embeddings=bool(config.get("tie_word_embeddings", True)))


def _llama_fields(config: dict, arch: str, source: str) -> dict:
    n_head = _required(config, "num_attention_heads", source)
    C = _required(config, "hidden_size", source)
    act = config.get("hidden_act", "silu")
    if act not in GATED_ACTS:
        raise _refuse(source, f"hidden_act={act}", "gptforge's gated MLPs use "
                      f"{', '.join(GATED_ACTS)}")
    mlp, gelu_form = GATED_ACTS[act]
    fields = dict(n_layer=_required(config, "num_hidden_layers", source), n_head=n_head,
                  n_kv_head=config.get("num_key_value_heads") or n_head, n_embd=C,
                  head_dim=config.get("head_dim") or C // n_head,
                  block_size=_required(config, "max_position_embeddings", source),
                  norm="rmsnorm", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  pos_emb="rope", rope_theta=_rope_theta(config, source),
                  mlp=mlp, gelu_approximate=gelu_form,
                  mlp_hidden=_required(config, "intermediate_size", source),
                  bias=_bias(config, arch, source), qk_norm=arch == "qwen3",
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    _refuse_sliding_window(config, arch, fields["block_size"], source)
    if arch == "mixtral":
        top_k = config.get("num_experts_per_tok", 2)
        if top_k < 2:  # Mixtral renormalises a single expert's weight to 1; gptforge keeps it
            raise _refuse(source, f"num_experts_per_tok={top_k}", "gptforge routes top-1 as "
                          "the Switch Transformer does (unnormalised), Mixtral does not")
        fields.update(n_experts=_required(config, "num_local_experts", source), moe_top_k=top_k,
                      moe_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.01)))
    return fields


def _rope_theta(config: dict, source: str) -> float:
    """The rotary base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (before);
    scaled variants (linear, dynamic, YaRN, Llama 3) are refused."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = value.get("rope_type", value.get("type", "default")) if value else "default"
        if kind != "default":
            raise _refuse(source, f"{key} (rope_type {kind})", "gptforge rotates with plain "
                          "RoPE, no scaling")
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise _refuse(source, f"partial_rotary_factor={factor}", "gptforge rotates every channel")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _bias(config: dict, arch: str, source: str) -> bool:
    """gptforge has one ``bias`` switch for every linear layer; Llama has two."""
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if arch == "llama" and attention != mlp:
        raise _refuse(source, f"attention_bias={attention} with mlp_bias={mlp}", "gptforge has "
                      "biases in every linear layer or in none")
    if arch != "llama" and attention:
        raise _refuse(source, "attention_bias=true", f"gptforge's {arch} has no biases")
    return attention


def _refuse_sliding_window(config: dict, arch: str, block_size: int, source: str) -> None:
    window = config.get("sliding_window")
    used = config.get("use_sliding_window", True) if arch == "qwen3" else arch == "mixtral"
    if used and window and window < block_size:
        raise _refuse(source, f"sliding_window={window}", "gptforge attends over the whole "
                      f"context ({block_size}); pass --block-size {window} to stay inside it")


# ---- weights -------------------------------------------------------------------------------

def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, from one or several safetensors or PyTorch files."""
    hf_dir = Path(hf_dir)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (hf_dir / index).is_file():
            files = _shard_files(hf_dir / index)
        elif (hf_dir / single).is_file():
            files = [hf_dir / single]
        else:
            continue
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(_read_file(file))
        return weights
    raise GptforgeError(f"{hf_dir}: no weights (model.safetensors, model.safetensors.index.json "
                        "or pytorch_model.bin)")


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as err:
        raise GptforgeError(f"{index}: not a shard index ({err})") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise GptforgeError(f"{index.parent}: missing shard {missing[0]} ({len(missing)} of "
                            f"{len(names)} listed in {index.name}); download it again")
    return [index.parent / n for n in names]


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise GptforgeError(f"{file} was refused: it holds objects other than tensors "
                            "(weights_only loading never runs pickled code)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise GptforgeError(f"{file} is damaged ({str(err).strip()[:200]})") from None
    if not isinstance(state, dict):
        raise GptforgeError(f"{file} holds no state dict")
    return state


def gptforge_weights(hf: dict[str, torch.Tensor], cfg: ModelConfig,
                     arch: str) -> dict[str, torch.Tensor]:
    """The weights under gptforge names (float32), checked against the model's names and shapes."""
    hf = {k: v for k, v in hf.items() if not k.endswith(_GPT2_BUFFERS)}
    take = _Taker(hf)
    ours = _gpt2(take, cfg) if arch == "gpt2" else _llama(take, cfg, arch)
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = take("lm_head.weight")
    take.check_all_used()
    ours = {k: v.to(torch.float32).contiguous() for k, v in ours.items()}
    _check_shapes(ours, cfg)
    return ours


class _Taker:
    """Reads transformers tensors by name, noting which ones were used."""

    def __init__(self, hf: dict[str, torch.Tensor]):
        self.hf, self.used = hf, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.hf:
            raise GptforgeError(f"the checkpoint lacks weight {name}; it is incomplete or does "
                                "not match its config.json")
        self.used.add(name)
        return self.hf[name]

    def check_all_used(self) -> None:
        extra = sorted(set(self.hf) - self.used - {"lm_head.weight"})
        if extra:
            raise GptforgeError(f"the checkpoint has weights its config.json does not explain "
                                f"({', '.join(extra[:3])}); it is not a plain model of its type")


def _gpt2(take: _Taker, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": take("transformer.wte.weight"),
           # A shorter context (--block-size) keeps the first rows of the position table.
           "pos_emb.weight": take("transformer.wpe.weight")[:cfg.block_size],
           "norm_f.weight": take("transformer.ln_f.weight"),
           "norm_f.bias": take("transformer.ln_f.bias")}
    for i in range(cfg.n_layer):
        for hf_name, (name, conv_width) in GPT2_LAYER.items():
            weight = take(f"transformer.h.{i}.{hf_name}.weight")
            out[f"blocks.{i}.{name}.weight"] = weight if conv_width is None else weight.t()
            out[f"blocks.{i}.{name}.bias"] = take(f"transformer.h.{i}.{hf_name}.bias")
    return out


def _llama(take: _Taker, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": take("model.embed_tokens.weight"),
           "norm_f.weight": take("model.norm.weight")}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for hf_name, name in LLAMA_NORMS.items():
            out[f"{ours}{name}.weight"] = take(f"{theirs}{hf_name}.weight")
        if arch == "qwen3":
            for hf_name, name in QK_NORMS.items():
                out[f"{ours}{name}.weight"] = take(f"{theirs}{hf_name}.weight")
        for kind in kinds:
            out[f"{ours}attn.qkv.{kind}"] = torch.cat([take(f"{theirs}{p}.{kind}")
                                                       for p in QKV_PARTS])
            out[f"{ours}attn.proj.{kind}"] = take(f"{theirs}self_attn.o_proj.{kind}")
            if arch != "mixtral":
                out[f"{ours}mlp.up.{kind}"] = torch.cat([take(f"{theirs}{p}.{kind}")
                                                         for p in GLU_PARTS])
                out[f"{ours}mlp.down.{kind}"] = take(f"{theirs}mlp.down_proj.{kind}")
        if arch == "mixtral":
            moe = theirs + MIXTRAL_MOE
            out[f"{ours}mlp.router.weight"] = take(moe + "gate.weight")
            for e in range(cfg.n_experts):
                out[f"{ours}mlp.experts.{e}.up.weight"] = torch.cat(
                    [take(f"{moe}experts.{e}.{p}.weight") for p in EXPERT_GLU_PARTS])
                out[f"{ours}mlp.experts.{e}.down.weight"] = take(f"{moe}experts.{e}.w2.weight")
    return out


def _check_shapes(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    with torch.device("meta"):  # names and shapes only, no memory
        expected = weights_to_save(model := GPT(cfg), model.state_dict())
    for name, tensor in expected.items():
        got = weights.get(name)
        if got is None or got.shape != tensor.shape:
            shape = None if got is None else tuple(got.shape)
            raise GptforgeError(f"weight {name} has shape {shape}, config.json implies "
                                 f"{tuple(tensor.shape)}; the checkpoint does not match its "
                                 "config")


# ---- the importer --------------------------------------------------------------------------

def import_huggingface(hf_dir: str | Path, out: str | Path, *, block_size: int = 0) -> Path:
    """Write the transformers checkpoint ``hf_dir`` as a gptforge checkpoint directory ``out``."""
    from safetensors.torch import save_file

    from gptforge.tokenizer import load_tokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    if not is_huggingface_dir(hf_dir):
        raise GptforgeError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    arch, cfg = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir), block_size)
    if not (hf_dir / "tokenizer.json").is_file():
        raise GptforgeError(f"{hf_dir}: no tokenizer.json; gptforge needs the model's tokenizer "
                            "(transformers' fast tokenizer file) beside the weights")
    tokenizer = load_tokenizer(hf_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GptforgeError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, more "
                            f"than the model's {cfg.vocab_size} embedding rows")
    weights = gptforge_weights(read_hf_weights(hf_dir), cfg, arch)
    with torch.device("meta"):
        weights = weights_to_save(GPT(cfg), weights)
    meta = {"format_version": FORMAT_VERSION, "step": 0, "val_loss": None,
            "model": cfg.to_dict(), "tokenizer": tokenizer_info(tokenizer),
            "imported_from": {"path": str(hf_dir.resolve()), "model_type": arch}}
    with atomic.directory(out) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer")
    log.info("imported %s (%s, %.2fM parameters, vocab %d, context %d) into %s", hf_dir, arch,
             sum(w.numel() for w in weights.values()) / 1e6, cfg.vocab_size, cfg.block_size, out)
    return out


def tokenizer_info(tokenizer) -> dict:
    """The tokenizer entry of ``model.json``, as a prepared dataset's manifest records it."""
    return {"kind": tokenizer.kind, "sha256": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id}

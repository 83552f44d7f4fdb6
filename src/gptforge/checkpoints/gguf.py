"""GGUF, the single-file model format of llama.cpp (and so of Ollama and LM Studio).

A GGUF file holds the weights, the hyper-parameters and the tokenizer as typed key/value metadata,
and the chat template, so ``llama-cli -m model.gguf`` needs nothing else. The file is written
with ``gguf.GGUFWriter``, the writer llama.cpp itself publishes, so its layout (alignment, key
types, tensor shapes in ggml order) is llama.cpp's own.

Which gptforge settings become which llama.cpp architecture is decided as for the Hugging Face
export (``huggingface.architecture_of``), since llama.cpp implements the same four models:
GPT-2 -> ``gpt2``, Llama -> ``llama``, Qwen3 -> ``qwen3``, Mixtral -> ``llama`` with experts. The
weights start from that export's tensors (``hf_state_dict``), renamed with gguf's own
``TensorNameMap`` (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``), and then changed
where llama.cpp's conventions differ from ``transformers``':

- llama.cpp's ``llama`` rotates adjacent channel pairs (2i, 2i+1) (GPT-J style), where gptforge
  and ``transformers`` pair channel i with i + head_dim/2 ("rotate half"). The rows of each
  query and key head are reordered so the same pairs rotate together: q·k is unchanged because
  queries and keys are reordered alike. ``qwen3`` uses rotate-half itself and needs no change.
- ``transformers``' GPT-2 stores linear weights as (in, out); GGUF as (out, in) like PyTorch.
- Mixtral's experts are one 3-D tensor per projection, (n_expert, out, in).
- The vocabulary loses gptforge's padding rows: llama.cpp requires as many embedding rows as
  tokens.

Tokenizers (``tokenizer.ggml.*``): byte-level BPE is llama.cpp's ``gpt2`` model (tokens, merges,
the GPT-2 pre-tokenizer regex); SentencePiece BPE is its ``llama`` model (pieces, scores, types,
byte fallback), with no invented leading space. A char vocabulary is written as a ``gpt2`` model
with one token per character and merges that only join the UTF-8 bytes of one character, which
encodes every in-vocabulary text to the same ids. A SentencePiece *unigram* model is refused:
llama.cpp's SentencePiece tokenizer merges by score, which is not unigram's segmentation.
The special tokens are control tokens; ``<|end|>`` is the end-of-turn token.

Types: f32, f16, bf16 and q8_0 (blocks of 32 weights sharing one scale, ``gguf.quants``). Norms,
biases, the position table and MoE routers stay in float32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from gptforge import atomic
from gptforge.checkpoints.huggingface import CHAT_TEMPLATE, architecture_of, hf_state_dict
from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig
from gptforge.tokenizer.base import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, load_tokenizer
from gptforge.tokenizer.chat_template import END_TOKEN, ROLE_TOKENS

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
DTYPES = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
          "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
          "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# transformers architecture (huggingface.py) -> llama.cpp architecture
GGUF_ARCHS = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA,
              "qwen3": gguf.MODEL_ARCH.QWEN3, "mixtral": gguf.MODEL_ARCH.LLAMA}
# Kept in float32 whatever the type: small, and llama.cpp reads them as float32.
FLOAT32_TENSORS = ("position_embd.weight", "ffn_gate_inp.weight")
# GPT-2's transformers weights stored transposed (Conv1D), by GGUF name.
CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
MIXTRAL_EXPERTS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def gguf_architecture(cfg: ModelConfig) -> str:
    """The ``transformers`` architecture whose llama.cpp counterpart computes what ``cfg`` does.

    llama.cpp's graphs fix two things transformers leaves to the config: the Llama-family MLP is
    SwiGLU (so GEGLU/ReGLU are refused), and GPT-2's GELU is the tanh form (``ggml_gelu``). An
    exact-GELU model (``model.gelu_approximate = "none"``) is written anyway, with a log line: the
    two forms differ by at most 4.7e-4, less than llama.cpp's own float16 GELU table adds.
    """
    try:
        arch = architecture_of(cfg)
    except GptforgeError as err:
        closest = str(err).partition("; the closest: ")[2]
        raise GptforgeError("this model has no llama.cpp (GGUF) architecture; the closest: "
                            f"{closest}") from None
    if cfg.gated_mlp and cfg.mlp != "swiglu":
        raise GptforgeError(f"this model has no llama.cpp (GGUF) architecture: model.mlp="
                            f"{cfg.mlp}, but llama.cpp's {arch} graph is SwiGLU (model.mlp=swiglu)")
    if arch == "gpt2" and cfg.gelu_approximate != "tanh":
        log.info("gguf: llama.cpp computes GPT-2's GELU in its tanh form; this model was trained "
                 "with the exact one (model.gelu_approximate=none): outputs differ slightly "
                 "(each activation by at most 4.7e-4)")
    return arch


# ---- weights -------------------------------------------------------------------------------

def gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under GGUF names and in llama.cpp's layout (float32)."""
    cfg: ModelConfig = model.config
    hf = hf_state_dict(model, arch)
    hf = _stack_experts(hf, cfg) if arch == "mixtral" else hf
    names = gguf.get_tensor_name_map(GGUF_ARCHS[arch], cfg.n_layer)
    out = {}
    for hf_name, tensor in hf.items():
        # stacked experts already carry their GGUF names
        name = hf_name if hf_name.startswith("blk.") else \
            names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GptforgeError(f"internal: no GGUF name for {hf_name}")
        out[name] = tensor.float()
    out["token_embd.weight"] = out["token_embd.weight"][:cfg.vocab_size]  # drop padding rows
    if "output.weight" in out:
        out["output.weight"] = out["output.weight"][:cfg.vocab_size]
    for name, tensor in out.items():
        if arch == "gpt2" and name.endswith(CONV1D):
            out[name] = tensor.t()
        elif arch in ("llama", "mixtral") and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.n_head if ".attn_q." in name else cfg.kv_heads
            out[name] = interleave_rope_rows(tensor, heads)
    return {k: v.contiguous() for k, v in out.items()}


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows (or bias entries) from rotate-half pairing, (i, i + hs/2), to
    adjacent pairs, (2i, 2i + 1): row 2i + j of a head is its old row j * hs/2 + i."""
    rows = weight.shape[0]
    hs = rows // n_heads
    split = weight.reshape(n_heads, 2, hs // 2, *weight.shape[1:])  # (nh, 2, hs/2, ...)
    return split.transpose(1, 2).reshape(weight.shape)  # (nh, hs/2, 2, ...) -> rows


def _stack_experts(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Mixtral's per-expert w1/w2/w3 as one (n_expert, out, in) tensor each, GGUF-named."""
    out = {}
    for name, tensor in hf.items():
        if ".block_sparse_moe.experts." not in name:
            out[name] = tensor
    for i in range(cfg.n_layer):
        prefix = f"model.layers.{i}.block_sparse_moe.experts."
        for hf_part, gguf_part in MIXTRAL_EXPERTS.items():
            out[f"blk.{i}.{gguf_part}.weight"] = torch.stack(
                [hf[f"{prefix}{e}.{hf_part}.weight"] for e in range(cfg.n_experts)])  # (E, out, in)
    return out


def encode_tensor(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, QT]:
    """(data, ggml type) of one tensor in ``dtype``; 1-D tensors and the position table and
    routers stay float32, and q8_0 falls back to f16 where a row is not a multiple of 32."""
    data = tensor.detach().cpu().float().numpy()
    qtype = DTYPES[dtype][0]
    if data.ndim == 1 or name.endswith(FLOAT32_TENSORS) or qtype == QT.F32:
        return data, QT.F32
    if qtype == QT.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
        log.warning("%s: rows of %d are not a multiple of 32; stored as f16", name,
                    data.shape[-1])
        qtype = QT.F16
    if qtype == QT.F16:
        if np.abs(data).max() > np.finfo(np.float16).max:
            raise GptforgeError(f"{name} holds values beyond float16's range (65504); export "
                                "with --dtype bf16 or f32")
        return data.astype(np.float16), QT.F16
    return gguf.quants.quantize(data, qtype), qtype


# ---- tokenizer -----------------------------------------------------------------------------

class GGUFVocab:
    """What ``tokenizer.ggml.*`` holds: the model kind, and per token its text, type, score."""

    def __init__(self, model: str, tokens: list[str], types: list[int], *, pre: str = "",
                 scores: list[float] | None = None, merges: list[str] | None = None):
        self.model, self.pre, self.tokens, self.types = model, pre, tokens, types
        self.scores, self.merges = scores, merges


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves,
    the others (controls, space, ...) take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def _token_type(text: str) -> int:
    return gguf.TokenType.CONTROL if text in SPECIAL_TOKENS else gguf.TokenType.NORMAL


def bpe_vocab(tokenizer_file: Path) -> GGUFVocab:
    """A byte-level BPE ``tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer model."""
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    if (data["model"].get("type") != "BPE" or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True)):
        raise GptforgeError(f"{tokenizer_file}: not a GPT-2 style byte-level BPE tokenizer "
                            "(as `gptforge tokenizer train --kind bpe` writes); llama.cpp's "
                            "gpt2 tokenizer would split text differently")
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    tokens = sorted(ids, key=ids.__getitem__)
    if [ids[t] for t in tokens] != list(range(len(tokens))):
        raise GptforgeError(f"{tokenizer_file}: token ids are not 0..{len(tokens) - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return GGUFVocab("gpt2", tokens, [_token_type(t) for t in tokens], pre="gpt-2",
                     merges=merges)


def char_vocab(chars: list[str]) -> GGUFVocab:
    """A char vocabulary as a ``gpt2`` model: each character is the byte-level text of its
    UTF-8 bytes, and merges join those bytes (left to right) and nothing else. A merge's left
    part starts with a lead byte and its right part is a continuation byte, so no merge can
    join bytes of two characters: every known character becomes its one token."""
    alphabet = byte_level_alphabet()
    tokens = list(SPECIAL_TOKENS)
    merges: dict[str, None] = {}  # ordered, without repeats
    for char in chars:
        pieces = [alphabet[b] for b in char.encode("utf-8")]
        for end in range(1, len(pieces)):
            merges["".join(pieces[:end]) + " " + pieces[end]] = None
        tokens.append("".join(pieces))
    # llama.cpp requires merges and gguf writes no empty list; byte 0xFF is never in UTF-8 text,
    # so this one never applies.
    never = alphabet[0xFF] + " " + alphabet[0xFF]
    return GGUFVocab("gpt2", tokens, [_token_type(t) for t in tokens], pre="gpt-2",
                     merges=list(merges) or [never])


def sentencepiece_vocab(model_file: Path) -> GGUFVocab:
    """A SentencePiece BPE model as llama.cpp's ``llama`` tokenizer model."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise GptforgeError(
            f"{model_file}: a SentencePiece unigram model; llama.cpp tokenizes SentencePiece "
            "models by merging pieces in score order, which gives other ids than unigram's "
            "segmentation: train the tokenizer with --sp-model-type bpe for a GGUF export")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                     gguf.TokenType.BYTE if sp.is_byte(i) else
                     gguf.TokenType.CONTROL if sp.is_control(i) or piece in SPECIAL_TOKENS else
                     gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL)
    return GGUFVocab("llama", tokens, types, pre="default", scores=scores)


def gguf_vocab(tokenizer_dir: Path) -> tuple[GGUFVocab, dict[str, int]]:
    """The checkpoint's tokenizer for llama.cpp, and the special tokens' ids."""
    tokenizer = load_tokenizer(tokenizer_dir)
    file = Path(tokenizer_dir) / tokenizer.file_name
    if tokenizer.kind == "bpe":
        vocab = bpe_vocab(file)
    elif tokenizer.kind == "sentencepiece":
        vocab = sentencepiece_vocab(file)
    else:
        vocab = char_vocab(tokenizer.chars)
    if len(vocab.tokens) != tokenizer.vocab_size:
        raise GptforgeError(f"{file}: {len(vocab.tokens)} tokens written for a vocabulary of "
                            f"{tokenizer.vocab_size}")
    return vocab, tokenizer.special_tokens


def add_tokenizer(writer: gguf.GGUFWriter, vocab: GGUFVocab, specials: dict[str, int]) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(False)  # gptforge trains without SentencePiece's dummy prefix
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if gguf.TokenType.UNKNOWN in vocab.types:
        writer.add_unk_token_id(vocab.types.index(gguf.TokenType.UNKNOWN))
    # As in the Hugging Face export: <|endoftext|> begins and ends documents, <|end|> ends a
    # chat turn; nothing is added to the text when it is tokenized.
    writer.add_bos_token_id(specials[EOS_TOKEN])
    writer.add_eos_token_id(specials[EOS_TOKEN])
    writer.add_eot_token_id(specials[END_TOKEN])
    writer.add_pad_token_id(specials[PAD_TOKEN])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


# ---- hyper-parameters and the file ---------------------------------------------------------

def add_hyperparameters(writer: gguf.GGUFWriter, model: torch.nn.Module, arch: str) -> None:
    cfg: ModelConfig = model.config
    expert_hidden = model.blocks[0].mlp.experts[0].down.in_features if cfg.n_experts else 0
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(expert_hidden or cfg.hidden_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_key_length(cfg.head_size)
    writer.add_value_length(cfg.head_size)
    if arch == "mixtral":
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.moe_top_k)


def write_gguf(model: torch.nn.Module, meta: dict, source: Path, out: Path, *,
               dtype: str = "f16", ollama: bool = False) -> Path:
    """Write ``model`` (from checkpoint ``source``) as the GGUF file ``out``, atomically: a
    temporary file beside it is renamed onto it when complete. With ``ollama``, also an Ollama
    ``Modelfile`` beside it."""
    if dtype not in DTYPES:
        raise GptforgeError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise GptforgeError(f"--out {out} is a directory; give the GGUF file's path "
                            "(e.g. model.gguf)")
    cfg: ModelConfig = model.config
    arch = gguf_architecture(cfg)
    vocab, specials = gguf_vocab(source / "tokenizer")
    if len(vocab.tokens) != cfg.vocab_size:
        raise GptforgeError(f"{source}: the model has {cfg.vocab_size} token rows but its "
                            f"tokenizer {len(vocab.tokens)} tokens")
    writer = gguf.GGUFWriter(None, GGUF_ARCHS[arch].name.lower())
    writer.add_name(source.parent.parent.name if source.parent.name == "ckpt" else source.name)
    writer.add_file_type(DTYPES[dtype][1])
    add_hyperparameters(writer, model, arch)
    add_tokenizer(writer, vocab, specials)
    for name, tensor in gguf_tensors(model, arch).items():
        data, qtype = encode_tensor(name, tensor, dtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        _write_atomically(writer, out)
        if ollama:
            atomic.write_text(out.with_name("Modelfile"), ollama_modelfile(out.name, cfg))
    except OSError as err:
        raise GptforgeError(f"could not write {out}: {err.strerror or err}") from None
    return out


def _write_atomically(writer: gguf.GGUFWriter, out: Path) -> None:
    f, tmp = atomic.create_temp_beside(out)
    f.close()
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
        atomic.fsync_directory(out.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


# ---- Ollama --------------------------------------------------------------------------------

# The chat template in the Go template language of Ollama: <|role|>content<|end|> per message,
# then <|assistant|> to open the reply (Ollama passes a SYSTEM prompt as a first message).
OLLAMA_TEMPLATE = ("{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}" + END_TOKEN
                   + "{{ end }}" + ROLE_TOKENS["assistant"])


def ollama_modelfile(gguf_name: str, cfg: ModelConfig) -> str:
    """An Ollama ``Modelfile`` for the GGUF file ``gguf_name`` in the same directory: the
    template, the end-of-turn stops and gptforge's sampling defaults."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
             f'PARAMETER stop "{END_TOKEN}"', f'PARAMETER stop "{EOS_TOKEN}"',
             "PARAMETER temperature 0.8",  # gptforge chat's default
             f"PARAMETER num_ctx {cfg.block_size}"]  # the context it was trained on
    return "\n".join(lines) + "\n"

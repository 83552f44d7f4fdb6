"""GGUF export: llama.cpp reads the file and computes what gptforge computes.

The parity tests load the file with ``llama_cpp`` (llama-cpp-python, a dev dependency that is
compiled on install; they are skipped where it is missing) and compare its logits, its greedy
continuations and its tokenization with gptforge's own. The other tests read the file back with
``gguf.GGUFReader`` (llama.cpp's Python reader) or check an invariant without any reader.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptforge.checkpoints.export import export_checkpoint
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.inference.engine import Engine
from gptforge.inference.sampling import SamplingSettings
from gptforge.model import GPT, ModelConfig
from gptforge.model.layers import apply_rope, rope_tables
from gptforge.tokenizer import train_tokenizer
from tests.conftest import make_corpus_text
from tests.tiny_checkpoints import save_model

gguf = pytest.importorskip("gguf")
from gptforge.checkpoints.gguf import CHAT_TEMPLATE, interleave_rope_rows  # noqa: E402

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False)
# name -> (model settings, tokenizer kind)
CASES = {
    "gpt2-bpe": ({}, "bpe"),
    "gpt2-char-untied": ({"tie_embeddings": False}, "char"),
    # llama.cpp's GPT-2 GELU is the tanh form: an exact-GELU model agrees to about 5e-4 more
    "gpt2-exact-gelu-bpe": ({"gelu_approximate": "none"}, "bpe"),
    "llama-gqa-bias-spm": ({**LLAMA, "n_kv_head": 2, "bias": True, "rope_theta": 500.0},
                           "sentencepiece"),
    "qwen3-bpe": ({**LLAMA, "qk_norm": True, "n_kv_head": 2, "tie_embeddings": False}, "bpe"),
    "mixtral-spm": ({**LLAMA, "n_experts": 4, "moe_top_k": 2}, "sentencepiece"),
}
# Non-ASCII text, digits and a special token, to exercise each tokenizer's edges.
TEXTS = ["ROMEO:\nJuliet loves the moon.", "  two  spaces, 42 stars!", "Nurse: héllo <|end|>x"]
PROMPTS = ["ROMEO:\n", "The night"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """One tokenizer of each kind, trained on the same small corpus (plus the test texts' odd
    characters, which the char vocabulary must contain)."""
    corpus = [make_corpus_text(200), *TEXTS]
    made = {}
    for kind, size in (("bpe", 330), ("sentencepiece", 340), ("char", None)):
        tokenizer = train_tokenizer(kind, corpus, size)
        directory = tmp_path_factory.mktemp(kind)
        tokenizer.save(directory)
        made[kind] = (tokenizer, directory)
    return made


def tiny_checkpoint(tmp_path, tokenizers, settings: dict, kind: str):
    tokenizer, tokenizer_dir = tokenizers[kind]
    torch.manual_seed(0)
    # A wide init spread makes the logits differ clearly from token to token (no near ties).
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32,
                      block_size=64, init_std=0.2, **settings)
    model = GPT(cfg).eval()
    if cfg.bias:  # non-zero biases, so that a misplaced one shows
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.2)
    return save_model(tmp_path / "run", model, tokenizer, tokenizer_dir), model, tokenizer


def gptforge_greedy(model, prompt: list[int], n: int) -> list[int]:
    steps = Engine(model).generate(prompt, SamplingSettings(max_new_tokens=n, temperature=0))
    return [int(t) for t in steps]


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_computes_and_tokenizes_as_gptforge(tmp_path, tokenizers, case):
    llama_cpp = pytest.importorskip("llama_cpp")
    settings, kind = CASES[case]
    ckpt, model, tokenizer = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    for dtype in ("f32", "f16"):
        path = export_checkpoint(ckpt, tmp_path / f"{dtype}.gguf", format="gguf", dtype=dtype)
        f32_cache = dict(type_k=0, type_v=0) if dtype == "f32" else {}  # 0: GGML_TYPE_F32
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False,
                              logits_all=True, **f32_cache)
        try:
            for text in TEXTS:
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                    tokenizer.encode(text), text
            if dtype == "f32":  # every position's logits, without the padded vocabulary rows
                llm.eval(prompts[0])
                with torch.no_grad():
                    ours = model(torch.tensor([prompts[0]]))[0, :, :tokenizer.vocab_size]
                theirs = torch.from_numpy(np.array(llm.scores[:len(prompts[0])]))
                assert ours.abs().max() > 1
                # ggml's GELU reads a float16 table: GPT-2 agrees to about 1e-3 only
                tolerance = 5e-3 if case.startswith("gpt2") else 1e-4
                torch.testing.assert_close(theirs, ours, rtol=tolerance, atol=tolerance)
            for prompt in prompts:
                assert llama_cpp_greedy(llm, prompt, 16) == gptforge_greedy(model, prompt, 16)
        finally:
            llm.close()


def test_gguf_metadata_and_tensors_read_back(tmp_path, tokenizers):
    settings, kind = CASES["qwen3-bpe"]
    ckpt, model, tokenizer = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    reader = gguf.GGUFReader(export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf",
                                               dtype="f32"))
    field = {name: f.contents() for name, f in reader.fields.items()}
    cfg = model.config
    assert field["general.architecture"] == "qwen3"
    assert (field["qwen3.context_length"], field["qwen3.block_count"],
            field["qwen3.attention.head_count"], field["qwen3.attention.head_count_kv"]) == \
        (64, 2, 4, 2)
    assert field["qwen3.rope.freq_base"] == cfg.rope_theta
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert len(field["tokenizer.ggml.tokens"]) == tokenizer.vocab_size < cfg.padded_vocab_size
    assert field["tokenizer.ggml.eot_token_id"] == tokenizer.special_tokens["<|end|>"]
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert field["tokenizer.chat_template"] == CHAT_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 11 * cfg.n_layer  # embd, norm, output; 11 per qwen3 block
    embd = tensors["token_embd.weight"]
    assert list(embd.shape) == [cfg.n_embd, tokenizer.vocab_size]  # ggml order: (in, rows)
    np.testing.assert_array_equal(embd.data, model.tok_emb.weight[:tokenizer.vocab_size]
                                  .detach().numpy())
    # qwen3 rotates halves like gptforge: its query rows are gptforge's, unpermuted
    q_rows = cfg.n_head * cfg.head_size
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data,
                                  model.blocks[0].attn.qkv.weight[:q_rows].detach().numpy())


@pytest.mark.parametrize("dtype, qtype, tolerance", [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2),
                                                     ("q8_0", "Q8_0", 1e-2)])
def test_reduced_types_stay_close_and_small_tensors_stay_float32(tmp_path, tokenizers, dtype,
                                                                 qtype, tolerance):
    settings, kind = CASES["gpt2-bpe"]
    ckpt, model, tokenizer = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    path = export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf", dtype=dtype)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == qtype
    for small in ("position_embd.weight", "blk.0.attn_norm.weight", "blk.0.ffn_up.bias"):
        assert tensors[small].tensor_type.name == "F32"
    up = tensors["blk.0.ffn_up.weight"]
    values = gguf.quants.dequantize(up.data, up.tensor_type).reshape(model.config.hidden_dim, -1)
    expected = model.blocks[0].mlp.up.weight.detach().numpy()
    assert np.abs(values - expected).max() <= tolerance * np.abs(expected).max()


def test_rope_row_order_turns_rotate_half_into_adjacent_pairs():
    """llama.cpp's llama rotates channels (2i, 2i+1); gptforge rotates (i, i + hs/2). Rotating
    the reordered rows the first way equals reordering the rows rotated the second way."""
    n_heads, hs, T = 3, 8, 5
    weight = torch.randn(n_heads * hs, 7)
    x = torch.randn(T, 7)
    cos, sin = rope_tables(hs, T, 10000.0)  # (T, hs/2)

    def heads(w):  # (T, nh, hs)
        return (x @ w.t()).view(T, n_heads, hs)

    rotated_half = apply_rope(heads(weight).transpose(0, 1), cos, sin)  # (nh, T, hs)
    pairs = heads(interleave_rope_rows(weight, n_heads)).transpose(0, 1)  # (nh, T, hs)
    even, odd = pairs[..., 0::2], pairs[..., 1::2]
    rotated_pairs = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    ordered = interleave_rope_rows(rotated_half.transpose(1, 2).reshape(n_heads * hs, T),
                                   n_heads)  # the same reordering applied after rotating
    torch.testing.assert_close(rotated_pairs.flatten(-2).transpose(1, 2).reshape(-1, T),
                               ordered)


def test_sentencepiece_unigram_is_refused(tmp_path):
    tokenizer = train_tokenizer("sentencepiece", [make_corpus_text(100)], 320,
                                sp_model_type="unigram")
    tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                            block_size=16))
    ckpt = save_model(tmp_path / "run", model, tokenizer, tmp_path / "tok")
    with pytest.raises(GptforgeError, match="unigram"):
        export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_gguf_export_ollama_and_errors(tmp_path, tokenizers, capsys):
    settings, kind = CASES["llama-gqa-bias-spm"]
    ckpt, model, tokenizer = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", str(ckpt), "--format", "gguf", "--dtype", "q8_0", "--ollama",
                 "--out", str(out)]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q8_0
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|end|>"' in modelfile and "PARAMETER num_ctx 64" in modelfile
    assert "<|{{ .Role }}|>{{ .Content }}<|end|>" in modelfile
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "model.gguf"]

    def fails(*args, message):
        assert main(["export", str(ckpt), *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    (tmp_path / "a_file").write_text("x")
    fails("--format", "gguf", "--out", str(tmp_path / "a_file" / "m.gguf"),
          message="could not write")
    assert (tmp_path / "a_file").read_text() == "x"
    fails("--format", "gguf", "--out", str(tmp_path), message="is a directory")
    fails("--format", "huggingface", "--dtype", "f16", "--out", str(tmp_path / "hf"),
          message="--format gguf only")
    torch.manual_seed(0)
    relu = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                           block_size=8, mlp="relu2"))
    relu_ckpt = save_model(tmp_path / "relu", relu, tokenizer, tokenizers[kind][1])
    assert main(["export", str(relu_ckpt), "--format", "gguf", "--out",
                 str(tmp_path / "relu.gguf")]) == 1
    assert "no llama.cpp (GGUF) architecture" in capsys.readouterr().err
    geglu = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                            block_size=8, norm="rmsnorm", pos_emb="rope", mlp="geglu"))
    geglu_ckpt = save_model(tmp_path / "geglu", geglu, tokenizer, tokenizers[kind][1])
    assert main(["export", str(geglu_ckpt), "--format", "gguf", "--out",
                 str(tmp_path / "geglu.gguf")]) == 1
    assert "graph is SwiGLU" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf"
                  or p.name.startswith(".")) == []


def test_ascii_char_vocabulary_loads_in_llama_cpp(tmp_path):
    """A char vocabulary without multi-byte characters has no merges of its own; llama.cpp
    still needs the merges key, and tokenizes like gptforge."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.tiny_checkpoints import make_base

    ckpt, _, tokenizer = make_base(tmp_path)
    path = export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        text = "hello, how are you?\n<|user|>I am fine."
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
        assert llm.detokenize(tokenizer.encode("fine. ok")).decode() == "fine. ok"
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_chat_uses_the_embedded_template(tmp_path, tokenizers):
    """llama-cpp-python renders the GGUF's Jinja chat template and replies what gptforge's
    greedy chat replies."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gptforge.tokenizer.chat_template import render_prompt, stop_ids

    settings, kind = CASES["qwen3-bpe"]
    ckpt, model, tokenizer = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    path = export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf", dtype="f32")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who loves the moon?"}]
    steps = Engine(model).generate(render_prompt(tokenizer, messages),
                                   SamplingSettings(max_new_tokens=12, temperature=0),
                                   stop_ids=stop_ids(tokenizer))
    reply = [int(t) for t in steps]
    reply = reply[:-1] if reply[-1] in stop_ids(tokenizer) else reply
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    try:
        out = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0, seed=0)
    finally:
        llm.close()
    # An untrained model emits stray UTF-8 bytes: llama-cpp-python drops them, gptforge shows
    # the replacement character.
    assert out["choices"][0]["message"]["content"] == tokenizer.decode(reply).replace("\ufffd", "")


@pytest.mark.parametrize("case", CASES)
def test_q8_0_is_what_llama_cpp_quantizes(tmp_path, tokenizers, case):
    """Our q8_0 file holds, tensor for tensor, the bytes llama.cpp's own quantizer
    (``llama_model_quantize``) makes from our float32 file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    settings, kind = CASES[case]
    ckpt, _, _ = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    f32 = export_checkpoint(ckpt, tmp_path / "f32.gguf", format="gguf", dtype="f32")
    ours = export_checkpoint(ckpt, tmp_path / "q8.gguf", format="gguf", dtype="q8_0")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q8_0
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    ours_t = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    theirs_t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(ours_t) == sorted(theirs_t)
    for name, tensor in ours_t.items():
        assert tensor.tensor_type == theirs_t[name].tensor_type, name
        np.testing.assert_array_equal(tensor.data, theirs_t[name].data, err_msg=name)


def test_f16_refuses_weights_beyond_its_range(tmp_path, tokenizers):
    settings, kind = CASES["gpt2-bpe"]
    ckpt, model, tokenizer = tiny_checkpoint(tmp_path, tokenizers, settings, kind)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = 1e5
    ckpt = save_model(tmp_path / "big", model, tokenizer, tokenizers[kind][1])
    with pytest.raises(GptforgeError, match="blk.0.ffn_up.weight .* --dtype bf16"):
        export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf", dtype="f16")
    assert not (tmp_path / "m.gguf").exists()
    assert export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf", dtype="bf16").is_file()

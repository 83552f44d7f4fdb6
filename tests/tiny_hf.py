"""Tiny Hugging Face model directories built in-process with ``transformers`` (nothing is
downloaded): a random model of each importable architecture saved with ``save_pretrained``, beside
a small byte-level BPE tokenizer saved as transformers saves a fast tokenizer."""

from __future__ import annotations

import torch

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 3,
          "a stitch in time saves nine; all that glitters is not gold.",
          "hello world, hello gptforge, goodbye world."]
VOCAB = 320  # embedding rows: more than the tokenizer's tokens, as real checkpoints often have
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
             initializer_range=0.2)
CONFIGS = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                initializer_range=0.2, bos_token_id=0, eos_token_id=0)),
    # GELU's exact (erf) form, model.gelu_approximate = "none" in gptforge
    "gpt2-exact-gelu": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, initializer_range=0.2, bos_token_id=0,
                                           eos_token_id=0, activation_function="gelu")),
    "llama": ("LlamaConfig", dict(SIZES, tie_word_embeddings=True)),
    "llama-exact-geglu": ("LlamaConfig", dict(SIZES, hidden_act="gelu")),
    "llama-bias-geglu": ("LlamaConfig", dict(SIZES, attention_bias=True, mlp_bias=True,
                                             hidden_act="gelu_pytorch_tanh", rope_theta=500.0)),
    "qwen3": ("Qwen3Config", dict(SIZES, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(SIZES, num_local_experts=4, num_experts_per_tok=2)),
}


def make_hf_tokenizer(directory):
    """A tiny byte-level BPE saved as transformers saves a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = _transformers().PreTrainedTokenizerFast(tokenizer_object=tok,
                                                   eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def make_hf_model(directory, name, save=lambda model, d: model.save_pretrained(d)):
    """A random model of architecture ``name`` (a key of CONFIGS) and the tokenizer in
    ``directory``; returns the model, in eval mode."""
    config_class, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(_transformers(), config_class)(**kwargs)
    model = _transformers().AutoModelForCausalLM.from_config(config).eval()
    save(model, directory)
    make_hf_tokenizer(directory)
    return model


def _transformers():
    import transformers

    return transformers

"""Batch-1 greedy generation speed: gptforge's engine against Hugging Face ``generate()``.

Both sides get a GPT-2 of the same shape (6 layers, 6 heads, 384 wide, 512 positions) with random
weights, a 4-token prompt, and must produce exactly 256 new tokens greedily (HF's end-of-text
stop is switched off). Variants take turns (A, B, C, A, B, C, ...) so that machine noise hits all
alike; the table gives the median tokens/s over rounds (prefill included) and the ratio to HF.

- ``hf``: ``GPT2LMHeadModel(GPT2Config(...)).generate(ids, do_sample=False, use_cache=True)``
- ``nocache``: gptforge, recomputing the whole context every step (the reference path)
- ``cache``: gptforge's default engine: KV cache, each step through the model's forward
- ``compiled``: ``Engine(model, compile=True)``: the compiled static-shape step (decode.py)
- ``compiled-bf16``: the same, streaming the weight matrices as bfloat16

The first generation of a compiled variant includes compilation; it is reported separately
("first call") and measured with an empty Inductor cache unless ``--keep-compile-cache``.

    python benchmarks/generate_throughput.py --vocab 65,50304
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from gptforge.inference.engine import Engine
from gptforge.inference.sampling import SamplingSettings
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT

N_LAYER, N_HEAD, N_EMBD, N_POSITIONS = 6, 6, 384, 512
PROMPT = [1, 2, 3, 4]


class HFRunner:
    def __init__(self, vocab: int):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # random configs warn about special token ids
        cfg = GPT2Config(vocab_size=vocab, n_positions=N_POSITIONS, n_embd=N_EMBD,
                         n_layer=N_LAYER, n_head=N_HEAD, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(cfg).eval()
        self.model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        self.model.generation_config.pad_token_id = 0

    def generate(self, n: int) -> int:
        ids = torch.tensor([PROMPT])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      use_cache=True, max_new_tokens=n)
        return out.shape[1] - len(PROMPT)


class GptforgeRunner:
    def __init__(self, model: GPT, vocab: int, variant: str):
        self.use_cache = variant != "nocache"
        self.engine = Engine(model, vocab, compile=variant.startswith("compiled"),
                             weight_dtype=torch.bfloat16 if variant.endswith("bf16") else None)

    def generate(self, n: int) -> int:
        settings = SamplingSettings(max_new_tokens=n, temperature=0)
        return sum(1 for _ in self.engine.generate(PROMPT, settings, use_cache=self.use_cache))


def build(variant: str, vocab: int, model: GPT):
    return HFRunner(vocab) if variant == "hf" else GptforgeRunner(model, vocab, variant)


def run_vocab(args, vocab: int) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
                            block_size=N_POSITIONS)).eval()
    runners = {v: build(v, vocab, model) for v in args.variants}
    first = {}
    for name, runner in runners.items():  # the first call compiles (compiled variants)
        t0 = time.perf_counter()
        assert runner.generate(args.new_tokens) == args.new_tokens
        first[name] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {v: [] for v in runners}
    names = list(runners)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            t0 = time.perf_counter()
            n = runners[name].generate(args.new_tokens)
            rates[name].append(n / (time.perf_counter() - t0))
    base = statistics.median(rates["hf"]) if "hf" in rates else float("nan")
    print(f"\nvocab {vocab}: {args.new_tokens} new tokens, batch 1, greedy; "
          f"{args.rounds} interleaved rounds")
    print(f"{'variant':15s} {'tok/s median':>12s} {'min':>7s} {'max':>7s} {'vs HF':>7s} "
          f"{'first call s':>12s}")
    rows = []
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:15s} {med:12.0f} {min(values):7.0f} {max(values):7.0f} "
              f"{med / base:6.2f}x {first[name]:12.2f}")
        rows.append({"vocab": vocab, "variant": name, "tok_s": round(med, 1),
                     "tok_s_all": [round(v) for v in values], "ratio_vs_hf": round(med / base, 3),
                     "first_call_s": round(first[name], 2)})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", default="65,50304", help="comma-separated vocabulary sizes")
    p.add_argument("--variants", default="hf,nocache,cache,compiled,compiled-bf16")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="use the usual Inductor cache instead of an empty one (warm start)")
    p.add_argument("--json", help="also append the JSON line to this file")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_compile_cache:  # report honest cold-compile times
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model {N_LAYER}L {N_HEAD}H {N_EMBD}w, {N_POSITIONS} positions")
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        rows += run_vocab(args, vocab)
    line = json.dumps({"benchmark": "generate_throughput", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rows": rows})
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight-only int8 inference (``--quantize int8``) against float32: speed, size, perplexity.

For one checkpoint and its prepared data directory: the bytes of the model's weights, the val
split's perplexity (float32 activations, up to ``--eval-tokens`` targets), and batch-1 greedy
decoding speed (tokens/s, median over rounds; the two variants take turns so machine noise hits
both alike). Speed alone can also be measured on a random model of a given shape (``--shape``).

    python benchmarks/int8_inference.py runs/shakespeare_char --data data/shakespeare_char
    python benchmarks/int8_inference.py --shape 12,12,768 --vocab 50304 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gptforge.checkpoints.format import resolve_checkpoint
from gptforge.checkpoints.loading import build_model
from gptforge.inference.engine import Engine
from gptforge.inference.int8 import quantize_int8, weight_bytes
from gptforge.inference.sampling import SamplingSettings
from gptforge.model import GPT, ModelConfig


def models(args) -> tuple[dict[str, GPT], object]:
    """{'float32': model, 'int8': the same weights quantized}, and the tokenizer (or None)."""
    if args.checkpoint:
        from gptforge.tokenizer import load_tokenizer

        ckpt = resolve_checkpoint(args.checkpoint)
        pair = {"float32": build_model(ckpt), "int8": quantize_int8(build_model(ckpt))}
        return pair, load_tokenizer(ckpt / "tokenizer")
    n_layer, n_head, n_embd = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      block_size=512)
    model = GPT(cfg)
    copy = GPT(cfg)
    copy.load_state_dict(model.state_dict())
    return {"float32": model, "int8": quantize_int8(copy)}, None


def tokens_per_second(model: GPT, n_tokens: int) -> float:
    engine = Engine(model.eval())
    start = time.perf_counter()
    for _ in engine.generate([0, 1, 2, 3], SamplingSettings(max_new_tokens=n_tokens,
                                                            temperature=0)):
        pass
    return n_tokens / (time.perf_counter() - start)


def perplexity(model: GPT, tokenizer, data_dir: str, max_tokens: int) -> float:
    from gptforge.eval.lm import evaluate_stream, prepared_stream
    from gptforge.runtime.device import resolve_precision

    precision = resolve_precision(torch.device("cpu"), "float32")
    stream = prepared_stream(data_dir, "val", tokenizer)
    return evaluate_stream(model.eval(), tokenizer, stream, precision=precision,
                           max_tokens=max_tokens).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--data", help="prepared data directory (for the val perplexity)")
    parser.add_argument("--shape", default="6,6,384", help="n_layer,n_head,n_embd (random model)")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair, tokenizer = models(args)
    result = {name: {"weight_MB": round(weight_bytes(m) / 2**20, 2)} for name, m in pair.items()}
    speeds = {name: [] for name in pair}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in pair.items():
                speeds[name].append(tokens_per_second(model, args.tokens))
        for name, model in pair.items():
            result[name]["tokens_per_s"] = round(statistics.median(speeds[name]), 1)
            if tokenizer is not None and args.data:
                result[name]["val_ppl"] = round(perplexity(model, tokenizer, args.data,
                                                           args.eval_tokens), 4)
    print(json.dumps({"threads": torch.get_num_threads(), **result}, indent=1))


if __name__ == "__main__":
    main()

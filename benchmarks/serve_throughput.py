"""``gptforge serve`` under concurrent load: continuous batching against one request at a time.

A random GPT (4 layers, 4 heads, 256 wide, 256 positions, char tokenizer, float32) is saved as a
checkpoint and served twice by ``gptforge serve`` in a subprocess on 127.0.0.1: with
``--max-batch 64`` (continuous batching) and ``--max-batch 1`` (one generation at a time, what
the server did before batching). For each number of concurrent streams (1, 8, 32, 64), every
stream sends ``--rounds`` greedy text completions of ``--max-tokens`` tokens one after the other;
the table gives completion tokens per second over the whole level (all streams, wall clock) and
the p50/p99 latency of one request (sending to last byte). Both servers answer the same requests.

    python benchmarks/serve_throughput.py --rounds 2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gptforge.checkpoints.format import save_checkpoint
from gptforge.checkpoints.state import weights_to_save
from gptforge.model import GPT, ModelConfig
from gptforge.tokenizer import train_tokenizer

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'-\n"
PROMPTS = ["Once upon a time", "The quick brown fox", "hello", "In the beginning there was"]


def make_checkpoint(directory: Path) -> Path:
    tokenizer = train_tokenizer("char", [TEXT])
    tokenizer.save(directory / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=256,
                      block_size=256)
    model = GPT(cfg).eval()
    return save_checkpoint(
        directory / "run", step=1, weights=weights_to_save(model, model.state_dict()),
        model_config=cfg, tokenizer_dir=directory / "tokenizer",
        tokenizer_info={"kind": tokenizer.kind, "sha256": tokenizer.fingerprint()},
        trainer_state={"step": 1}, val_loss=None)


def start_server(ckpt: Path, max_batch: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", str(ckpt), "--port", "0", "--device", "cpu",
         "--max-batch", str(max_batch), "--max-queue", "256"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "GPTFORGE_API_KEY": ""})
    line = proc.stderr.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()  # drain the log
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


def one_request(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one greedy completion."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=body)
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {answer}")
    return time.perf_counter() - started, answer["usage"]["completion_tokens"]


def run_level(port: int, streams: int, rounds: int, max_tokens: int) -> dict:
    latencies, tokens, lock = [], [0], threading.Lock()

    def stream(i: int) -> None:
        for r in range(rounds):
            seconds, n = one_request(port, PROMPTS[(i + r) % len(PROMPTS)], max_tokens)
            with lock:
                latencies.append(seconds)
                tokens[0] += n

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"streams": streams, "requests": len(latencies), "tokens": tokens[0],
            "wall_s": wall, "tokens_per_s": tokens[0] / wall,
            "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8,32,64")
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp))
        for name, max_batch in (("batching (--max-batch 64)", 64),
                                ("one at a time (--max-batch 1)", 1)):
            proc, port = start_server(ckpt, max_batch)
            try:
                one_request(port, "warm up", 4)
                for streams in levels:
                    result = {"server": name, **run_level(port, streams, args.rounds,
                                                           args.max_tokens)}
                    print(json.dumps(result), flush=True)
                    rows.append(result)
            finally:
                proc.terminate()
                proc.wait(30)
    print("\n| server | streams | requests | tokens/s | p50 latency | p99 latency | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['streams']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
              f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['wall_s']:.1f} s |")


if __name__ == "__main__":
    main()

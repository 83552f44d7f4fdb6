"""``gptforge prepare`` throughput (tokens/s) with 1 and with N encoding workers.

Writes a synthetic JSONL corpus (Zipf-distributed made-up words in ~2 KB documents, ~50 MB by
default) into a scratch directory, saves a byte-level BPE tokenizer (4096 ids) trained on its first
1000 documents and a char tokenizer, then runs ``prepare`` on the whole corpus with a saved
tokenizer, so what is timed is reading, dedup, splitting, encoding and writing, not tokenizer
training. The worker counts take turns (1, 2, 1, 2, ...) for several rounds, so noise from other
processes on the machine hits them alike; the table shows the median and best over rounds.

``encode tok/s`` is the manifest's ``stats.tokens_per_s`` (the encoding phase); ``end-to-end
tok/s`` divides by the wall time of the whole ``prepare`` call (hashing the input included);
``cpu s`` is the CPU time of the process and its workers.

    python benchmarks/prepare_throughput.py --mb 50 --workers 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(2, 9)))
             for _ in range(20_000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    documents = size = 0
    with path.open("w") as f:
        while size < megabytes << 20:
            sentences = [" ".join(rng.choices(words, weights, k=rng.randint(5, 18))).capitalize()
                         + "." for _ in range(rng.randint(10, 30))]
            line = json.dumps({"text": " ".join(sentences) + "\n"}) + "\n"
            f.write(line)
            size += len(line)
            documents += 1
    return documents


def save_tokenizers(corpus: Path, scratch: Path) -> dict[str, Path]:
    from gptforge.tokenizer import train_tokenizer

    with corpus.open() as f:
        sample = [json.loads(next(f))["text"] for _ in range(1000)]
    tokenizers = {}
    for kind, vocab_size in (("bpe", 4096), ("char", None)):
        tokenizers[kind] = scratch / f"tok_{kind}"
        train_tokenizer(kind, sample, vocab_size).save(tokenizers[kind])
    return tokenizers


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_once(corpus: Path, tokenizer: Path, workers: int, out: Path) -> dict:
    from gptforge.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    cpu, started = cpu_seconds(), time.perf_counter()
    manifest = prepare([str(corpus)], out, str(tokenizer), workers=workers,
                       shard_tokens=5_000_000, progress=False)
    wall = time.perf_counter() - started
    tokens = manifest["stats"]["tokens"]
    return {"encode": manifest["stats"]["tokens_per_s"], "end_to_end": tokens / wall,
            "wall": wall, "cpu": cpu_seconds() - cpu, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="corpus size in MB (default: 50)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "char"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as tmp:
        scratch = Path(tmp)
        corpus = scratch / "corpus.jsonl"
        documents = write_corpus(corpus, args.mb)
        print(f"corpus: {corpus.stat().st_size / 2**20:.1f} MiB, {documents:,} documents")
        tokenizers = save_tokenizers(corpus, scratch)
        results: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            for kind in args.tokenizers:
                for workers in args.workers:
                    result = run_once(corpus, tokenizers[kind], workers, scratch / "out")
                    results.setdefault((kind, workers), []).append(result)
        print("| tokenizer | workers | tokens | encode tok/s (median, best) | end-to-end tok/s "
              "(median) | wall s (median) | cpu s (median) |")
        print("|---|---|---|---|---|---|---|")
        for (kind, workers), runs in results.items():
            encode = [r["encode"] for r in runs]
            print(f"| {kind} | {workers} | {runs[0]['tokens']:,} | "
                  f"{statistics.median(encode):,.0f}, {max(encode):,.0f} | "
                  f"{statistics.median(r['end_to_end'] for r in runs):,.0f} | "
                  f"{statistics.median(r['wall'] for r in runs):.1f} | "
                  f"{statistics.median(r['cpu'] for r in runs):.1f} |")


if __name__ == "__main__":
    main()

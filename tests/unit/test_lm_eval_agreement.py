"""gptforge's MMLU scoring against lm-evaluation-harness on the same model and rows.

A random tiny model is exported to the transformers layout; lm-evaluation-harness scores it on a
local task whose YAML restates its ``mmlu`` task (same prompt, letters, description and
``first_n`` dev shots) over a few MMLU rows; ``gptforge eval`` scores the gptforge checkpoint on
the same rows in the hendrycks CSV layout. The per-choice log-likelihoods and the accuracy must
agree. Nothing is downloaded (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from gptforge.checkpoints.export import export_checkpoint
from gptforge.cli import main
from gptforge.model import GPT, ModelConfig
from gptforge.tokenizer import train_tokenizer
from tests.tiny_checkpoints import save_model

SUBJECT = "tiny_algebra"
ROWS = [("What is 2 + 2?", "3", "4", "5", "22", "B"),
        ("Which is a prime?", "9", "15", "21", "7", "D"),
        ("Solve x - 1 = 0.", "x = 1", "x = 0", "x = -1", "no x", "A"),
        ("What is 3 * 3?", "6", "33", "9", "0", "C"),
        ("Is 0 even?", "yes", "no", "both", "neither", "A"),
        ("Largest of 1, 5, 3?", "1", "3", "5", "none", "C")]
DEV = [("What is 1 + 1?", "2", "3", "4", "5", "A"),
       ("What is 10 / 2?", "2", "5", "8", "20", "B")]
# The same prompt as lm-evaluation-harness's mmlu task (lm_eval/tasks/mmlu/default).
TASK_YAML = """\
task: gptforge_mmlu_rows
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about tiny algebra.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. \
{{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


def write_rows(tmp_path):
    """The rows as hendrycks CSV files (for gptforge) and as cais/mmlu JSONL (for lm-eval)."""
    for split, rows in (("test", ROWS), ("dev", DEV)):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        with open(tmp_path / "mmlu" / split / f"{SUBJECT}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        records = [{"question": r[0], "subject": SUBJECT, "choices": list(r[1:5]),
                    "answer": "ABCD".index(r[5])} for r in rows]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rows.yaml").write_text(
        TASK_YAML.format(test=tmp_path / "test.jsonl", dev=tmp_path / "dev.jsonl"))


def tiny_checkpoint(tmp_path):
    text = ("The following are multiple choice questions (with answers) about tiny algebra.\n"
            + " ".join(str(c) for r in ROWS + DEV for c in r) + " Answer: ABCD =-+*/?,.")
    tokenizer = train_tokenizer("char", [text])
    tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                         block_size=512, init_std=0.2)
    ckpt = save_model(tmp_path / "run", GPT(config).eval(), tokenizer, tmp_path / "tok")
    return ckpt, export_checkpoint(ckpt, tmp_path / "hf", format="huggingface")


@pytest.mark.slow
def test_mmlu_scores_agree_with_lm_evaluation_harness(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    write_rows(tmp_path)
    ckpt, hf_dir = tiny_checkpoint(tmp_path)

    out = tmp_path / "ours.json"
    assert main(["eval", str(ckpt), "--task", str(tmp_path / "mmlu"), "--task-format", "mmlu",
                 "--shots", "2", "--dtype", "float32", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["task"]

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["gptforge_mmlu_rows"],
        num_fewshot=2, device="cpu", batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    their_acc = theirs["results"]["gptforge_mmlu_rows"]["acc,none"]
    samples = sorted(theirs["samples"]["gptforge_mmlu_rows"], key=lambda s: s["doc_id"])

    # Per-choice log-likelihoods: ours recomputed with the same functions the CLI uses.
    from gptforge.checkpoints.loading import build_model
    from gptforge.eval.multiple_choice import build_requests, score_requests
    from gptforge.eval.tasks import load_task
    from gptforge.runtime.device import Precision
    from gptforge.tokenizer import load_tokenizer

    task = load_task(str(tmp_path / "mmlu"), "mmlu", shots=2)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    requests = build_requests(tokenizer, task.examples, 512)
    scores = score_requests(build_model(ckpt).eval(), requests,
                            precision=Precision(torch.device("cpu"), torch.float32),
                            batch_size=8, pad_id=tokenizer.pad_id)
    their_scores = [float(resp[0][0]) for s in samples for resp in s["resps"]]
    assert len(samples) == len(ROWS) and [s["target"] for s in samples] == \
        ["ABCD".index(r[5]) for r in ROWS]
    assert scores == pytest.approx(their_scores, abs=1e-3)
    assert ours["examples"] == len(ROWS)
    assert abs(ours["acc"] - their_acc) <= 0.005

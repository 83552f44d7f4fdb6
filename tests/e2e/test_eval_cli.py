"""`gptforge eval` as a user runs it: prepared shards and raw text, multiple-choice tasks, the
JSON results, and one-line errors. Tiny models and data are made in the test."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

import gptforge
from gptforge.cli import main
from gptforge.model import GPT
from tests.conftest import make_corpus_text
from tests.tiny_checkpoints import make_base, make_lora_checkpoint, save_model, tiny_config

F32 = ["--dtype", "float32", "--device", "cpu", "--no-progress"]
FACTS = {"ROMEO loves": " the moon.", "JULIET sees": " the stars.",
         "NURSE calls": " her friend.", "FRIAR greets": " the night."}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny checkpoint, a corpus, and that corpus prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    ckpt, model, tokenizer = make_base(root, block_size=32, init_std=0.3)
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus_text(40))
    data = root / "data"
    assert main(["prepare", "--input", str(corpus), "--tokenizer", str(ckpt / "tokenizer"),
                 "--out", str(data), "--val-fraction", "0", "--workers", "1"]) == 0
    return root, ckpt, model, tokenizer, corpus, data


def run_eval(args, capsys, tmp_path, name="r.json"):
    out = tmp_path / name
    assert main(["eval", *map(str, args), *F32, "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_prepared_shards_and_raw_text_give_the_same_numbers(setup, tmp_path, capsys):
    root, ckpt, model, _, corpus, data = setup
    from_data, table = run_eval([root / "base", "--data", data, "--split", "train",
                                 "--batch-size", "3"], capsys, tmp_path, "data.json")
    from_text, _ = run_eval([ckpt, "--text", corpus], capsys, tmp_path, "text.json")
    manifest = json.loads((data / "manifest.json").read_text())["splits"]["train"]
    lm = from_data["lm"]
    # Every token of the split is a target once (an end-of-text is put in front of it).
    assert lm["tokens"] == manifest["tokens"] == from_text["lm"]["tokens"]
    assert lm["bytes"] == manifest["bytes"] == len(corpus.read_bytes())
    assert lm["loss"] == pytest.approx(from_text["lm"]["loss"], rel=1e-6)
    assert lm["bits_per_byte"] == pytest.approx(from_text["lm"]["bits_per_byte"], rel=1e-6)
    assert lm["perplexity"] == pytest.approx(torch.tensor(lm["loss"]).exp().item(), rel=1e-6)
    assert (lm["data"], lm["split"], lm["stride"], lm["block_size"]) == (
        str(data), "train", 32, 32)
    assert from_data["checkpoint"] == str(ckpt.resolve()) and from_data["step"] == 1
    assert from_data["model"]["params"] == model.num_params()
    assert from_data["model"]["n_layer"] == 2 and from_data["model"]["lora"] is False
    assert from_data["gptforge_version"] == gptforge.__version__
    assert (from_data["device"], from_data["dtype"]) == ("cpu", "float32")
    assert "task" not in from_data and from_data["seconds"] >= 0
    assert f"{lm['loss']:.4f} nats/token" in table and "bits per byte" in table


def test_lora_checkpoint_is_scored_with_its_adapters(setup, tmp_path, capsys):
    root, ckpt, model, tokenizer, corpus, _ = setup
    base, _ = run_eval([ckpt, "--text", corpus, "--max-tokens", "200"], capsys, tmp_path)
    lora_root = tmp_path / "lora"
    lora_ckpt = make_lora_checkpoint(lora_root, ckpt, GPT(model.config), tokenizer)
    tuned, _ = run_eval([lora_ckpt, "--text", corpus, "--max-tokens", "200"], capsys, tmp_path)
    assert tuned["model"]["lora"] is True and tuned["lm"]["tokens"] == 200
    assert tuned["lm"]["loss"] != pytest.approx(base["lm"]["loss"], rel=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (about a second) on four sentences in random order."""
    root = tmp_path_factory.mktemp("trained")
    _, _, tokenizer = make_base(root)
    rng = random.Random(0)
    text = "".join(rng.choice([k + v + "\n" for k, v in FACTS.items()]) for _ in range(400))
    ids = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, block_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 33, (16,))
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_model(root / "run", model.eval(), tokenizer, root / "tokenizer")


def test_a_trained_model_picks_the_sentences_it_learned(trained, tmp_path, capsys):
    endings = list(FACTS.values())
    records = [{"context": name, "choices": endings, "label": i}
               for i, name in enumerate(FACTS)]
    task = tmp_path / "facts.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in records))
    results, table = run_eval([trained, "--task", task, "--batch-size", "5"], capsys, tmp_path)
    assert results["task"] == {**results["task"], "task": str(task), "format": "mc",
                               "examples": 4, "acc": 1.0, "acc_norm": 1.0, "acc_stderr": 0.0}
    assert "lm" not in results and "acc_norm" in table
    # Shuffled labels: the model's answers stay the sentences it learned, so all are wrong.
    wrong = [{**r, "label": (r["label"] + 1) % 4} for r in records]
    task.write_text("".join(json.dumps(r) + "\n" for r in wrong))
    results, _ = run_eval([trained, "--task", task], capsys, tmp_path)
    assert results["task"]["acc"] == 0.0


def run_error(args, capsys) -> str:
    code = main(["eval", *map(str, args), *F32])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_give_one_line(setup, tmp_path, capsys):
    root, ckpt, _, _, corpus, data = setup
    task = tmp_path / "t.jsonl"
    good = '{"context": "a", "choices": [" b", " c"], "label": 0}\n'
    assert "no such task file" in run_error([ckpt, "--task", task], capsys)
    task.write_text(good + '{"context": "a", "choices": [" b",\n')
    assert f"{task}:2: invalid JSON" in run_error([ckpt, "--task", task], capsys)
    task.write_text(good.replace('"label": 0', '"label": 5'))
    assert f"{task}:1: label 5 is out of range" in run_error([ckpt, "--task", task], capsys)
    task.write_text("")
    assert "holds no examples" in run_error([ckpt, "--task", task], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "no text in the inputs" in run_error([ckpt, "--text", empty], capsys)
    assert "no such file" in run_error([ckpt, "--text", tmp_path / "none.txt"], capsys)
    assert "has no 'val' split" in run_error([ckpt, "--data", data], capsys)
    assert "larger than the model's block_size 32" in run_error(
        [ckpt, "--text", corpus, "--stride", "33"], capsys)
    assert "--batch-size must be at least 1" in run_error(
        [ckpt, "--text", corpus, "--batch-size", "0"], capsys)
    assert "nothing to evaluate" in run_error([ckpt], capsys)
    assert "no such checkpoint" in run_error([tmp_path / "nope", "--text", corpus], capsys)
    assert "is a directory" in run_error([ckpt, "--text", corpus, "--out", tmp_path], capsys)


def test_data_prepared_with_another_tokenizer_is_refused(setup, tmp_path, capsys):
    root, ckpt, _, _, corpus, _ = setup
    other = tmp_path / "other"
    # `--tokenizer char` trains a new char tokenizer on the corpus: other characters, other ids.
    assert main(["prepare", "--input", str(corpus), "--tokenizer", "char", "--out", str(other),
                 "--workers", "1"]) == 0
    capsys.readouterr()
    line = run_error([ckpt, "--data", other], capsys)
    assert "prepared with a different tokenizer than the checkpoint's" in line


# --------------------------------------------------------------------------- benchmarks


GSM = [("ann?", "2+3=5", "5"), ("bob?", "4*2=8", "8"), ("cy?", "9-1=8", "8"), ("di?", "6/2=3", "3")]
MMLU_HEADER = "The following are multiple choice questions (with answers) about tiny math.\n"


def gsm_record(question: str, work: str, number: str) -> dict:
    return {"question": question, "answer": f"{work}\n#### {number}"}


def gsm_block(record: dict) -> str:
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


@pytest.fixture(scope="module")
def gsm_text(tmp_path_factory):
    """Four GSM8K-style problems in random order, laid out as few-shot prompts are, and a char
    tokenizer that also covers the MMLU header."""
    from gptforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("gsm")
    blocks = [gsm_block(gsm_record(*g)) for g in GSM]
    rng = random.Random(0)
    text = "\n\n".join(rng.choice(blocks) for _ in range(300)) + "\n\n"
    tokenizer = train_tokenizer("char", [text + MMLU_HEADER + "ABCD"])
    tokenizer.save(root / "tokenizer")
    return root, text, tokenizer


@pytest.fixture(scope="module")
def untrained(gsm_text):
    root, _, tokenizer = gsm_text
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, block_size=64)).eval()
    return save_model(root / "untrained", model, tokenizer, root / "tokenizer")


@pytest.fixture(scope="module")
def solver(gsm_text):
    """A tiny model trained (a few seconds) on the problems until it knows their answers."""
    root, text, tokenizer = gsm_text
    ids = torch.tensor(tokenizer.encode(text))
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, block_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_model(root / "solver", model.eval(), tokenizer, root / "tokenizer")


def write_records(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.mark.slow
def test_gsm8k_few_shot_exact_match_of_a_model_that_learned_the_answers(solver, tmp_path,
                                                                       capsys):
    test = write_records(tmp_path / "test.jsonl", [gsm_record(*g) for g in GSM[1:]])
    write_records(tmp_path / "train.jsonl", [gsm_record(*GSM[0])])
    args = [solver, "--task", test, "--task-format", "gsm8k", "--shots", "1",
            "--max-new-tokens", "16", "--pass-k", "1"]
    results, table = run_eval(args, capsys, tmp_path)
    task = results["task"]
    assert (task["examples"], task["exact_match"], task["pass@1"]) == (3, 1.0, 1.0)
    assert task["stop"] == ["Question:", "\n\n"] and task["extract"] == "number"
    assert task["samples"][0]["output"].startswith(" 4*2=8\n#") and task["shots"] == 1
    assert "exact_match" in table and "repetition-4" in table
    # Other right answers: every one is now wrong.
    wrong = [gsm_record(q, w, str(int(n) + 1)) for q, w, n in GSM[1:]]
    write_records(test, wrong)
    results, _ = run_eval(args, capsys, tmp_path)
    assert results["task"]["exact_match"] == 0.0
    # Several samples: pass@k is reported for each k asked.
    write_records(test, [gsm_record(*g) for g in GSM[1:]])
    results, _ = run_eval([*args, "--num-samples", "3", "--pass-k", "3", "--temperature",
                           "0.5"], capsys, tmp_path)
    task = results["task"]
    assert task["num_samples"] == 3 and 0 < task["pass@1"] <= task["pass@3"] <= 1


def test_mmlu_and_piqa_with_the_core_aggregate_and_a_skipped_row(untrained, tmp_path,
                                                                 capsys):
    import csv

    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        with open(tmp_path / "mmlu" / split / f"tiny_math_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("ann?", "5", "6", "8", "9", "A"),
                                     ("bob?", "3", "8", "2", "5", "B")])
    piqa = write_records(tmp_path / "piqa.jsonl", [
        {"goal": "di?", "sol1": "3", "sol2": "8", "label": 0},
        {"goal": "cy?", "sol1": "5" * 100, "sol2": "6", "label": 1}])  # longer than 64 tokens
    results, table = run_eval([untrained, "--task", tmp_path / "mmlu", "--task-format", "mmlu",
                               "--task", piqa, "--task-format", "piqa", "--bench", "core",
                               "--shots", "1"], capsys, tmp_path)
    mmlu, piqa_result = results["tasks"]
    assert (mmlu["shots"], piqa_result["shots"]) == (1, 0)  # PIQA takes no shots
    assert (mmlu["format"], mmlu["examples"], mmlu["random_baseline"]) == ("mmlu", 2, 0.25)
    assert mmlu["groups"] == {"tiny math": {"examples": 2, "acc": mmlu["acc"]}}
    assert (piqa_result["examples"], piqa_result["skipped"]) == (1, 1)
    assert piqa_result["skipped_examples"] == [f"{piqa}:2"]
    centred = [(mmlu["acc_norm"] - 0.25) / 0.75, (piqa_result["acc_norm"] - 0.5) / 0.5]
    assert results["core"]["core"] == pytest.approx(sum(centred) / 2)
    assert "CORE-style aggregate" in table and "skipped" in table and "subjects" in table


def test_bad_benchmark_inputs_give_one_line(untrained, tmp_path, capsys):
    solver = untrained
    task = write_records(tmp_path / "t.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b",
                                                 "label": 0}])
    gsm = write_records(tmp_path / "gsm.jsonl", [gsm_record(*GSM[0]), {"question": "q"}])
    assert f"{gsm}:2: no field 'answer'" in run_error(
        [solver, "--task", gsm, "--task-format", "gsm8k"], capsys)
    assert "--chat applies to generative tasks" in run_error(
        [solver, "--task", task, "--task-format", "piqa", "--chat"], capsys)
    assert "pass@4 needs at least 4 samples" in run_error(
        [solver, "--task", gsm, "--task-format", "gsm8k", "--pass-k", "4"], capsys)
    assert "2 --task options but 3 --task-format" in run_error(
        [solver, "--task", task, "--task", task, "--task-format", "piqa", "--task-format", "mc",
         "--task-format", "mc"], capsys)
    assert "--task-split applies to the exam formats" in run_error(
        [solver, "--task", task, "--task-format", "piqa", "--task-split", "val"], capsys)
    assert "leaves no room for the prompt" in run_error(
        [solver, "--task", gsm, "--task-format", "gsm8k", "--max-new-tokens", "64"], capsys)
    (tmp_path / "exam" / "test").mkdir(parents=True)
    (tmp_path / "exam" / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq,a,b\n")
    assert "x_test.csv:2: 3 columns, expected 6" in run_error(
        [solver, "--task", tmp_path / "exam", "--task-format", "mmlu"], capsys)


def test_generate_task_as_chat_reports_text_metrics(untrained, tmp_path, capsys):
    task = write_records(tmp_path / "g.jsonl", [{"prompt": "ann?", "answer": ["5", "five"]},
                                                {"prompt": "bob?", "answer": "8"}])
    results, table = run_eval([untrained, "--task", task, "--task-format", "generate", "--chat",
                               "--max-new-tokens", "8", "--stop", "#", "--stop", "\\n"],
                              capsys, tmp_path)
    task = results["task"]
    assert (task["chat"], task["extract"], task["stop"], task["num_samples"]) == (
        True, "text", ["#", "\n"], 1)  # "\\n" typed in a shell is a newline
    assert all("#" not in s["output"] and "\n" not in s["output"] and len(s["output"]) <= 8
               for s in task["samples"])
    assert set(task) >= {"exact_match", "bleu", "chrf", "distinct_1", "distinct_2",
                         "repetition_4"}
    assert "generative:" in table and "chat" in table

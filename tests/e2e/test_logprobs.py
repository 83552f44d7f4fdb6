"""Log probabilities from ``gptforge serve`` over HTTP: chat ``logprobs``/``top_logprobs`` and text
``logprobs`` + ``echo``, whole and streamed, against the model's log-softmax computed here in one
plain forward pass (no KV cache); and lm-evaluation-harness's ``local-completions`` model scoring
a small multiple-choice task through the server, against the same rows scored in-process.
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

import gptforge
from gptforge.checkpoints.export import export_checkpoint
from gptforge.model import GPT, ModelConfig
from gptforge.serve.server import ModelServer
from gptforge.tokenizer import train_tokenizer
from gptforge.tokenizer.chat_template import render_prompt
from tests.e2e.test_serve import call
from tests.tiny_checkpoints import make_base, save_model

HELLO = [{"role": "user", "content": "hello"}]
ROWS = [{"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
        {"question": "Which is a prime?", "choices": ["9", "15", "21", "7"], "answer": 3},
        {"question": "Is 0 even?", "choices": ["yes", "no", "both", "neither"], "answer": 0},
        {"question": "Largest of 1, 5, 3?", "choices": ["1", "3", "5", "none"], "answer": 2}]
TASK_YAML = """\
task: gptforge_serve_rows
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt, model, tokenizer = make_base(tmp_path_factory.mktemp("logprobs"))
    server = ModelServer(gptforge.load(ckpt, device="cpu"), port=0, model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, model, tokenizer
    server.shutdown()
    server.close()


def reference_logprobs(model, ids: list[int], vocab_size: int) -> torch.Tensor:
    """(T-1, V): log-softmax at each position of ``ids`` but the last, without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1, :vocab_size]
    return torch.log_softmax(logits.float(), dim=-1)


def test_chat_logprobs_are_the_models_log_softmax(served):
    server, model, tokenizer = served
    body = {"messages": HELLO, "max_tokens": 12, "temperature": 0.9, "seed": 3,
            "logprobs": True, "top_logprobs": 3}
    status, _, answer = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and "".join(e["token"] for e in content) == choice["message"]["content"]
    prompt = render_prompt(tokenizer, HELLO)
    reply = tokenizer.encode(choice["message"]["content"])
    ref = reference_logprobs(model, prompt + reply, tokenizer.vocab_size)[len(prompt) - 1:]
    for t, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(float(ref[t, reply[t]]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        best = torch.topk(ref[t], 3)
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(
            best.values.tolist(), abs=1e-4)
        assert [e["token"] for e in entry["top_logprobs"]] == \
            [tokenizer.decode([i]) for i in best.indices.tolist()]

    streamed = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})[2]
    events = [json.loads(line[6:]) for line in streamed.split("\n\n")
              if line.startswith("data: {")]
    pieces = [e for ev in events for c in ev["choices"] if c["logprobs"]
              for e in c["logprobs"]["content"]]
    assert pieces == content  # the same seed: the same tokens, scored the same


def test_text_echo_scores_the_prompt_and_the_continuation(served):
    server, model, tokenizer = served
    prompt = "hello, how are"
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    status, _, answer = call(server, "POST", "/v1/completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and "".join(lp["tokens"]) == choice["text"]
    ids = tokenizer.encode(choice["text"])
    ref = reference_logprobs(model, ids, tokenizer.vocab_size)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(
        [float(ref[t, ids[t + 1]]) for t in range(len(ids) - 1)], abs=1e-4)
    assert lp["text_offset"] == list(range(len(ids)))  # one character per token
    for t, top in enumerate(lp["top_logprobs"][len(prompt):], start=len(prompt)):
        # Greedy: the chosen token is the most likely one, and the dict holds it.
        assert max(top.values()) == pytest.approx(lp["token_logprobs"][t], abs=1e-6)
        assert math.exp(max(top.values())) == pytest.approx(float(ref[t - 1].exp().max()), 1e-4)

    scored = call(server, "POST", "/v1/completions",
                  {"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": True})[2]
    assert scored["choices"][0]["text"] == prompt
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == \
        lp["token_logprobs"][:len(prompt)]

    streamed = call(server, "POST", "/v1/completions", {**body, "stream": True})[2]
    events = [json.loads(line[6:]) for line in streamed.split("\n\n")
              if line.startswith("data: {")]
    logprobs = [c["logprobs"] for ev in events for c in ev["choices"] if c["logprobs"]]
    assert sum((x["tokens"] for x in logprobs), []) == lp["tokens"]
    assert sum((x["text_offset"] for x in logprobs), []) == lp["text_offset"]


def rows_checkpoint(tmp_path):
    """A random tiny model whose char tokenizer covers the rows, and its transformers export
    (lm-eval counts the context's tokens with that tokenizer)."""
    text = "Question: Answer:\n " + json.dumps(ROWS)
    tokenizer = train_tokenizer("char", [text])
    tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                         block_size=256, init_std=0.2)
    model = GPT(config).eval()
    ckpt = save_model(tmp_path / "run", model, tokenizer, tmp_path / "tok")
    return ckpt, model, tokenizer, export_checkpoint(ckpt, tmp_path / "hf", format="huggingface")


@pytest.mark.slow
def test_lm_evaluation_harness_scores_through_the_server(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rows.yaml").write_text(TASK_YAML.format(test=tmp_path / "test.jsonl"))
    ckpt, model, tokenizer, hf_dir = rows_checkpoint(tmp_path)
    server = ModelServer(gptforge.load(ckpt, device="cpu"), port=0, model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={server.url}/v1/completions,model=tiny,"
                       f"tokenizer_backend=huggingface,tokenizer={hf_dir},"
                       "tokenized_requests=False,max_length=256",
            tasks=["gptforge_serve_rows"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                     include_defaults=False))
    finally:
        server.shutdown()
        server.close()
    samples = sorted(results["samples"]["gptforge_serve_rows"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ROWS)
    correct = 0
    for sample, row in zip(samples, ROWS):
        ours = []
        for context, continuation in sample["arguments"]:
            ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
            ref = reference_logprobs(model, ctx + cont, tokenizer.vocab_size)[len(ctx) - 1:]
            ours.append(sum(float(ref[t, c]) for t, c in enumerate(cont)))
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += max(range(len(ours)), key=ours.__getitem__) == row["answer"]
    assert results["results"]["gptforge_serve_rows"]["acc,none"] == correct / len(ROWS)

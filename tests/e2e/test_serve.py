"""``gptforge serve`` over real HTTP on 127.0.0.1: replies equal the Python API's, the stream
format, stop strings, seeds, n, the official ``openai`` client, every error path, the API key, a
client that leaves mid-stream, and the command's start and shutdown.

The server runs in a thread of the test process on a free port, serving a tiny random model; the
reference replies come from a second, independent ``gptforge.load`` of the same checkpoint.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import gptforge
from gptforge.cli import main
from gptforge.serve.server import ModelServer
from gptforge.tokenizer.chat_template import render_prompt
from tests.tiny_checkpoints import make_base

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("serve"))[0]


@pytest.fixture(scope="module")
def reference(ckpt):
    return gptforge.load(ckpt, device="cpu")


def start_server(ckpt, **kwargs) -> ModelServer:
    server = ModelServer(gptforge.load(ckpt, device="cpu"), port=0, model_name="tiny", **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(ckpt):
    server = start_server(ckpt)
    yield server
    server.shutdown()
    server.close()


def call(server, method: str, path: str, body=None, headers: dict | None = None):
    """(status, response headers, parsed JSON or the raw text) of one request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, response, json.loads(raw)
    return response.status, response, raw


def post(server, path: str, body: dict, **kwargs):
    status, _, answer = call(server, "POST", path, body, **kwargs)
    assert status == 200, answer
    return answer


def events(raw: str) -> list:
    """The data of each Server-Sent Event; the final "[DONE]" stays a string."""
    out = []
    for block in raw.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def log_lines(caplog, containing: str) -> list[str]:
    """The server's request lines that contain ``containing``, once there is one (a line is
    written just after its response, so it may come a moment after the client has the answer;
    lines of earlier tests may still arrive, so look for content, not counts)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "gptforge.serve.server"
                 and containing in r.getMessage()]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def chat(server, messages, **fields) -> dict:
    return post(server, "/v1/chat/completions", {"model": "tiny", "messages": messages, **fields})


def complete(server, prompt, **fields) -> dict:
    return post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, **fields})


def test_chat_replies_are_the_python_apis(server, reference):
    conversations = [
        HELLO,
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "how are you?"}],
        # The next two share their beginning: the server's kept KV cache serves the second.
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am fine."},
         {"role": "user", "content": "ok"}],
    ]
    tokenizer = reference.tokenizer
    for messages in conversations:
        answer = chat(server, messages, max_tokens=12, temperature=0)
        expected = reference.chat(messages, max_new_tokens=12, temperature=0)
        choice = answer["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": expected}
        assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
        assert answer["id"].startswith("chatcmpl-") and isinstance(answer["created"], int)
        # A char tokenizer: one token per character, plus the end token if the turn ended.
        ended = choice["finish_reason"] == "stop"
        assert choice["finish_reason"] == ("stop" if len(expected) < 12 else "length")
        assert answer["usage"] == {
            "prompt_tokens": len(render_prompt(tokenizer, messages)),
            "completion_tokens": len(expected) + ended,
            "total_tokens": len(render_prompt(tokenizer, messages)) + len(expected) + ended}
    # Content parts and the developer role are what newer clients send.
    parts = [{"role": "developer", "content": "Be kind."},
             {"role": "user", "content": [{"type": "text", "text": "how are you?"}]}]
    assert chat(server, parts, max_tokens=12, temperature=0)["choices"][0]["message"]["content"] \
        == reference.chat(conversations[1], max_new_tokens=12, temperature=0)


def test_a_resent_conversation_prefills_only_its_new_tokens(server, monkeypatch):
    """The server keeps its KV cache between requests, as a chat UI re-sends the conversation."""
    model = server.generator.model
    forward, prefilled = model.forward, []

    def counting_forward(idx, *args, **kwargs):
        prefilled.append(idx.size(1))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    first = [{"role": "user", "content": "hello there, how are you?"}]
    answer = chat(server, first, max_tokens=5, temperature=0)
    reply = answer["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "ok"}]
    prefilled.clear()
    answer = chat(server, second, max_tokens=5, temperature=0)
    # The reply's last token (sampled, never fed back), then <|end|><|user|>ok<|end|><|assistant|>.
    assert answer["usage"]["prompt_tokens"] > 30 and prefilled[0] == 7


def test_streamed_chat_is_the_same_reply(server, reference):
    status, response, raw = call(server, "POST", "/v1/chat/completions", {
        "messages": HELLO, "max_completion_tokens": 10, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    chunks = events(raw)
    assert chunks[-1] == "[DONE]"
    *pieces, last, usage = chunks[:-1]
    assert pieces[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in pieces)
    assert text == reference.chat(HELLO, max_new_tokens=10, temperature=0)
    assert all(c["choices"][0]["finish_reason"] is None for c in pieces)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in pieces + [last])  # null until the usage chunk
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert {c["object"] for c in chunks[:-1]} == {"chat.completion.chunk"}


def test_completions_stream_and_not(server, reference):
    for prompt in ("hello", "I am", ""):
        expected = reference.generate(prompt, max_new_tokens=15, temperature=0)
        answer = complete(server, prompt, max_tokens=15, temperature=0)
        assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
        assert answer["choices"][0]["text"] == expected
        assert answer["usage"]["prompt_tokens"] == len(reference.encode_prompt(prompt))
        ended = len(reference.tokenizer.encode(expected)) < 15  # at the end-of-text token
        assert answer["choices"][0]["finish_reason"] == ("stop" if ended else "length")
        assert answer["usage"]["completion_tokens"] == (
            len(reference.tokenizer.encode(expected)) + 1 if ended else 15)
        _, _, raw = call(server, "POST", "/v1/completions",
                         {"prompt": prompt, "max_tokens": 15, "temperature": 0, "stream": True})
        chunks = events(raw)
        assert chunks[-1] == "[DONE]" and "usage" not in chunks[-2]
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expected
        assert chunks[-2]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
    # Default max_tokens is the API's 16; a one-prompt batch is a prompt.
    assert complete(server, ["hello"], temperature=0)["choices"][0]["text"] == \
        reference.generate("hello", max_new_tokens=16, temperature=0)


def test_text_decoder_holds_back_incomplete_characters():
    """What keeps a streamed piece (of any of n choices) from ending in half a character."""
    from gptforge.inference.textgen import TextDecoder

    class Bytes:  # a byte-level tokenizer: ids are bytes
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    decoder = TextDecoder(Bytes())
    pieces = [decoder.push(b) for b in "a\u00e9\u4e2d!".encode()]
    assert pieces == ["a", None, "\u00e9", None, None, "\u4e2d", "!"]


def test_stop_strings_cut_the_text(server, reference):
    full = reference.chat(HELLO, max_new_tokens=20, temperature=0)
    assert len(full) == 20 and full[1:3] * 3 in full  # the tiny model repeats one character
    for stop in (full[1:3], [full[3:6], "never"], full[:1], ["never", "also never"]):
        first = min((full.find(s) for s in ([stop] if isinstance(stop, str) else stop)
                     if s in full), default=len(full))
        answer = chat(server, HELLO, max_tokens=20, temperature=0, stop=stop)
        choice = answer["choices"][0]
        assert choice["message"]["content"] == full[:first]
        assert choice["finish_reason"] == ("stop" if first < len(full) else "length")
        # Tokens up to the one that completed the stop string.
        n_stop = len(stop) if isinstance(stop, str) else len(stop[0])
        assert answer["usage"]["completion_tokens"] == min(first + n_stop, 20)
        _, _, raw = call(server, "POST", "/v1/chat/completions", {
            "messages": HELLO, "max_tokens": 20, "temperature": 0, "stop": stop,
            "stream": True})
        chunks = events(raw)[:-1]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) \
            == full[:first]
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_frequency_and_presence_penalties_are_the_python_apis(server, reference):
    penalties = dict(frequency_penalty=1.5, presence_penalty=-0.5)
    expected = reference.generate("hello", max_new_tokens=20, temperature=0, **penalties)
    assert expected != reference.generate("hello", max_new_tokens=20, temperature=0)
    answer = complete(server, "hello", max_tokens=20, temperature=0, n=2, **penalties)
    assert [c["text"] for c in answer["choices"]] == [expected, expected]  # rows count apart
    reply = chat(server, HELLO, max_tokens=20, temperature=0.0, **penalties)
    assert reply["choices"][0]["message"]["content"] == reference.chat(
        HELLO, max_new_tokens=20, temperature=0, **penalties)


def test_seed_reproduces_a_sample(server, reference):
    body = dict(max_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    first = complete(server, "hello", **body)["choices"][0]["text"]
    assert complete(server, "hello", **body)["choices"][0]["text"] == first
    assert first == reference.generate("hello", max_new_tokens=20, temperature=1.0, top_p=0.9,
                                       seed=3)
    assert complete(server, "hello", **{**body, "seed": 4})["choices"][0]["text"] != first
    reply = chat(server, HELLO, **body)["choices"][0]["message"]["content"]
    assert reply == reference.chat(HELLO, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)


def test_a_reply_that_ends_its_turn(server, reference):
    """finish_reason "stop" from the model's own <|end|>, which usage counts."""
    for seed in range(100):  # find a sampled reply shorter than max_tokens: it ended itself
        expected = reference.chat(HELLO, max_new_tokens=15, temperature=2.0, seed=seed)
        if len(expected) < 15:
            break
    else:
        pytest.fail("no seed in 100 gave a reply that ends before 15 tokens")
    answer = chat(server, HELLO, max_tokens=15, temperature=2.0, seed=seed)
    assert answer["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": expected}}
    assert answer["usage"]["completion_tokens"] == len(expected) + 1


def test_several_choices(server, reference):
    greedy = complete(server, "hello", max_tokens=8, temperature=0, n=3)
    expected = reference.generate("hello", max_new_tokens=8, temperature=0)
    assert [c["text"] for c in greedy["choices"]] == [expected] * 3
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert greedy["usage"]["completion_tokens"] == 24
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 1.5, "seed": 0, "n": 2}
    whole = chat(server, **{k: v for k, v in body.items() if k != "messages"},
                 messages=HELLO)["choices"]
    assert whole[0]["message"]["content"] != whole[1]["message"]["content"]
    _, _, raw = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    texts, reasons = ["", ""], [None, None]
    for chunk in events(raw)[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        reasons[choice["index"]] = reasons[choice["index"]] or choice["finish_reason"]
    assert texts == [c["message"]["content"] for c in whole]
    assert reasons == [c["finish_reason"] for c in whole]


def test_the_official_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with client:  # closes its keep-alive connections at the end
        check_the_openai_client(openai, client, reference)


def check_the_openai_client(openai, client, reference):
    assert [m.id for m in client.models.list()] == ["tiny"]
    expected = reference.chat(HELLO, max_new_tokens=10, temperature=0)
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10,
                                           temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(render_prompt(reference.tokenizer, HELLO))
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 10
    text = client.completions.create(model="tiny", prompt="hello", max_tokens=10, temperature=0)
    assert text.choices[0].text == reference.generate("hello", max_new_tokens=10, temperature=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    penalised = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10,
                                               temperature=0, frequency_penalty=0.5)
    assert penalised.choices[0].message.content == reference.chat(
        HELLO, max_new_tokens=10, temperature=0, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="tiny", messages=HELLO, frequency_penalty=2.5)


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/chat/completions", {}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content",
     "only text parts"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 400, "temperature",
     "must be a finite number"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": 2.5}, 400, "temperature",
     "<= 2"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 17}, 400, "n", "<= 16"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, 400, "stream", "true or"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": ["a", ""]}, 400, "stop", "non-empty"),
    ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": -2.5}, 400,
     "presence_penalty", ">= -2"),
    ("/v1/chat/completions", {"messages": HELLO, "repetition_penalty": 0}, 400,
     "repetition_penalty", "> 0"),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs",
     "needs"),
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", "<= 20"),
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": 1}, 400, "logprobs", "true or"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function"}]}, 400,
     "tools[0]", "must be"),
    ("/v1/chat/completions", {"messages": HELLO, "tool_choice": "required"}, 400,
     "tool_choice", "supported"),
    ("/v1/chat/completions", {"messages": HELLO, "response_format": {"type": "json_object"}},
     400, "response_format", "only"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 20}]}, 400,
     "messages", "context window"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 60}, 400, "max_tokens",
     "at most 56"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "caf\u00e9"}]}, 400,
     "messages", "vocabulary"),
    ("/v1/chat/completions", {"messages": HELLO, "model": "gpt-4o"}, 404, "model",
     "does not exist"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt", "must be a string"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo", "true or"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs", "<= 5"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "hi", "seed": 1.5}, 400, "seed", "integer"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param, words):
    got, _, answer = call(server, "POST", path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    if "context window" in words or "at most" in words:
        assert error["code"] == "context_length_exceeded"


def test_routes_methods_and_sizes(server):
    assert call(server, "GET", "/health")[2] == {"status": "ok", "model": "tiny",
                                                 "queue_depth": 0, "active_requests": 0,
                                                 "active_slots": 0, "slots": 16}
    models = call(server, "GET", "/v1/models")[2]
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert call(server, "GET", "/v1/models/tiny")[2]["id"] == "tiny"
    cases = [("GET", "/v1/models/other", 404, "model_not_found"),
             ("GET", "/v2/anything", 404, "not_found"),
             ("POST", "/", 405, "method_not_allowed"),
             ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
             ("DELETE", "/v1/models", 405, "method_not_allowed")]
    for method, path, status, code in cases:
        got, response, answer = call(server, method, path)
        assert (got, answer["error"]["code"]) == (status, code), (method, path, answer)
    assert call(server, "GET", "/v1/chat/completions")[1].getheader("Allow") == "POST"
    # Too large: refused from its Content-Length, before the body is read.
    got, response, answer = call(server, "POST", "/v1/completions", b"{}",
                                 headers={"Content-Length": str(5 * 2**20)})
    assert got == 413 and answer["error"]["code"] == "request_too_large"
    assert response.getheader("Connection") == "close"


def test_api_key(ckpt):
    server = start_server(ckpt, api_key="sekrit")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            got, response, answer = call(server, "GET", "/v1/models", headers=headers)
            assert got == 401 and answer["error"]["code"] == "invalid_api_key"
            assert response.getheader("WWW-Authenticate") == "Bearer"
        got, _, _ = call(server, "POST", "/v1/completions", {"prompt": "hi"})
        assert got == 401
        assert call(server, "GET", "/health")[0] == 200  # for probes, no key
        key = {"Authorization": "Bearer sekrit"}
        assert call(server, "GET", "/v1/models", headers=key)[0] == 200
        assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 0},
                    headers=key)["usage"]["completion_tokens"] == 2
    finally:
        server.shutdown()
        server.close()


class Gate:
    """Wraps a server's batch decoder so that its decode step ``hold_at`` waits until
    ``resume`` is set (the first ``hold_at`` tokens are out by then); ``steps`` counts the
    decode steps computed."""

    def __init__(self, server, monkeypatch, hold_at: int = 3):
        self.steps, self.held, self.resume = 0, threading.Event(), threading.Event()
        decoder = server.scheduler.decoder
        real_decode = decoder.decode

        def gated_decode(*args, **kwargs):
            logits = real_decode(*args, **kwargs)
            self.steps += 1
            if self.steps == hold_at:
                self.held.set()
                self.resume.wait(10)
            return logits

        monkeypatch.setattr(decoder, "decode", gated_decode)


def start_stream(server) -> socket.socket:
    """A streamed chat request on a raw socket, read until the role chunk and two tokens."""
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    body = json.dumps({"messages": HELLO, "max_tokens": 50, "temperature": 0, "stream": True})
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 f"{len(body)}\r\n\r\n{body}".encode())
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    return sock


def test_client_leaving_mid_stream_stops_generation(server, reference, monkeypatch, caplog):
    """The stream is held after two tokens; meanwhile /health answers and the client leaves."""
    caplog.set_level(logging.INFO, logger="gptforge.serve")
    gate = Gate(server, monkeypatch)
    sock = start_stream(server)
    assert gate.held.wait(10)
    started = time.perf_counter()
    assert call(server, "GET", "/health")[0] == 200  # answered while a generation runs
    assert call(server, "GET", "/v1/models")[0] == 200
    assert time.perf_counter() - started < 5
    sock.close()
    gate.resume.set()
    # The next request is served (the lock was let go), and equals the reference.
    monkeypatch.undo()
    assert chat(server, HELLO, max_tokens=10, temperature=0)["choices"][0]["message"][
        "content"] == reference.chat(HELLO, max_new_tokens=10, temperature=0)
    assert gate.steps <= 4  # stopped at once, not after 50 tokens
    left = log_lines(caplog, "client went away")
    assert len(left) == 1 and left[0].startswith("POST /v1/chat/completions 499")


def test_shutdown_stops_the_generation_under_way(ckpt, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="gptforge.serve")
    server = start_server(ckpt)
    gate = Gate(server, monkeypatch)
    sock = start_stream(server)
    try:
        assert gate.held.wait(10)
        server.shutdown()
        threading.Timer(0.2, gate.resume.set).start()
        server.close()  # waits until the generation let go and the connection's thread ended
        assert not server.scheduler.active and not server._connections
        assert gate.steps <= 4
        (line,) = log_lines(caplog, "(server shutting down)")
        assert line.startswith("POST /v1/chat/completions 499 ")
    finally:
        gate.resume.set()
        sock.close()


def test_one_log_line_per_request_and_unknown_fields(server, caplog):
    caplog.set_level(logging.INFO, logger="gptforge.serve")
    complete(server, "hi", max_tokens=3, temperature=0, cache_prompt=True)
    call(server, "POST", "/v1/completions", {"prompt": "hi", "top_p": 7})
    (ok,) = log_lines(caplog, "/v1/completions 200")
    assert ok.startswith("POST /v1/completions 200 2+3 tokens ") and ok.endswith(" s")
    (bad,) = log_lines(caplog, "/v1/completions 400")
    assert bad.startswith("POST /v1/completions 400 ") and "top_p must be" in bad
    assert any("'cache_prompt'" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_serve_command_help_and_bad_checkpoint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--api-key" in capsys.readouterr().out
    assert main(["serve", "/nonexistent/run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no such checkpoint" in err[0]


@pytest.mark.slow
def test_serve_command_starts_answers_and_stops_on_sigterm(ckpt):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", str(ckpt), "--port", "0", "--device", "cpu",
         "--model-name", "m"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "GPTFORGE_API_KEY": ""})
    try:
        line = proc.stderr.readline()
        assert "serving 'm' on http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "m"
        conn.close()
        assert proc.stderr.readline().startswith("GET /v1/models 200 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert rest == "shutting down\n", rest
    finally:
        proc.kill()
        proc.stderr.close()

"""``gptforge serve`` against a hostile client, on 127.0.0.1: a burst of 64 simultaneous
streams, clients that reset their connections, HTTP/1.0, HEAD, odd Content-Length headers, and
request fields fuzzed within and beyond their documented ranges (never a 500).

The server runs in a thread of the test process, serving the tiny random model that
``tests/e2e/test_serve.py`` uses; its helpers are reused from there.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import struct
import threading
import time

import pytest

from gptforge.cli import main
from tests.e2e.test_serve import HELLO, call, events, log_lines, start_server
from tests.tiny_checkpoints import make_base

HUGE = 10**400  # JSON carries integers of any size; no float holds this one


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("hardening"))[0]


@pytest.fixture(scope="module")
def server(ckpt):
    server = start_server(ckpt)
    yield server
    server.shutdown()
    server.close()


def raw_request(server, request: bytes, *, read: bool = True) -> bytes:
    """Send ``request`` as it is on a new connection and read the reply until the server closes
    the connection."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while read and (chunk := sock.recv(65536)):
            chunks.append(chunk)
    return b"".join(chunks)


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST) instead of the usual FIN, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_http_1_0_clients_get_http_1_0_replies_without_chunks(server):
    health = raw_request(server, b"GET /health HTTP/1.0\r\n\r\n")
    head, _, body = health.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and json.loads(body)["status"] == "ok"
    request = json.dumps({"messages": HELLO, "max_tokens": 5, "temperature": 0,
                          "stream": True})
    streamed = raw_request(server, f"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: "
                                   f"{len(request)}\r\n\r\n{request}".encode())
    head, _, body = streamed.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and b"chunked" not in head.lower()
    assert b"connection: close" in head.lower()
    chunks = events(body.decode())  # plain events, no chunk sizes between them
    assert chunks[-1] == "[DONE]" and chunks[0]["object"] == "chat.completion.chunk"
    # HTTP/1.1 still streams in chunks.
    streamed = raw_request(server, f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                   f"Connection: close\r\nContent-Length: {len(request)}"
                                   f"\r\n\r\n{request}".encode())
    assert b"transfer-encoding: chunked" in streamed.partition(b"\r\n\r\n")[0].lower()


def head(server, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("HEAD", path)
    response = conn.getresponse()
    response.read()  # http.client knows a HEAD reply has no body
    conn.close()
    return response


def test_head_of_get_routes(server):
    for path in ("/health", "/v1/models", "/v1/models/tiny"):
        response = head(server, path)
        assert response.status == 200, path
        # The length of the body a GET would have sent.
        assert int(response.getheader("Content-Length")) == len(
            json.dumps(call(server, "GET", path)[2], ensure_ascii=False).encode())
    health = raw_request(server, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close"
                                 b"\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200 ") and health.endswith(b"\r\n\r\n")  # no body
    response = head(server, "/v1/chat/completions")
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert call(server, "PUT", "/health")[1].getheader("Allow") == "GET, HEAD"


@pytest.mark.parametrize("value", ["-1", "+5", "1e3", "0x10", "5, 7", "99999999999999999999"])
def test_content_length_that_is_not_a_size_is_a_400(server, value):
    reply = raw_request(server, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                f"{value}\r\n\r\n{{}}".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"connection: close" in head.lower()
    assert "Content-Length" in json.loads(body)["error"]["message"]
    two = raw_request(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                              b"Content-Length: 3\r\n\r\n{}")
    assert two.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("field, value", [
    ("temperature", HUGE), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", float("-inf")), ("repetition_penalty", HUGE), ("repetition_penalty", 1e400),
    ("frequency_penalty", -HUGE), ("top_k", "5"), ("seed", 2**64), ("n", HUGE),
    ("max_tokens", HUGE),
], ids=lambda v: "HUGE" if v in (HUGE, -HUGE) else None)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_numbers_are_400_before_any_stream(server, field, value, stream):
    body = json.dumps({"messages": HELLO, "max_tokens": 3, "stream": stream, field: value})
    status, response, answer = call(server, "POST", "/v1/chat/completions", body.encode())
    assert status == 400, answer
    assert response.getheader("Content-Type") == "application/json"
    assert answer["error"]["param"] == field and answer["error"]["type"] == \
        "invalid_request_error"
    assert len(answer["error"]["message"]) < 200  # a 401-digit number is not echoed whole


@pytest.mark.parametrize("fields", [
    {"temperature": 1e-40}, {"temperature": 1e-300}, {"temperature": 5e-324},
    {"repetition_penalty": 1e-300}, {"repetition_penalty": 1e300},
    {"temperature": 2, "repetition_penalty": 1e-300, "top_p": 0},
])
@pytest.mark.parametrize("stream", [False, True])
def test_extreme_values_in_range_are_answered(server, fields, stream):
    body = {"messages": HELLO, "max_tokens": 4, "stream": stream, **fields}
    status, _, answer = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    if stream:
        chunks = events(answer)
        assert chunks[-1] == "[DONE]" and all("error" not in c for c in chunks[:-1])
    else:
        assert answer["usage"]["completion_tokens"] >= 1


def test_client_resets_cost_one_log_line_each(server, caplog, capfd):
    caplog.set_level(logging.INFO, logger="gptforge.serve")
    # Reset while the headers are being read, then while the body is being read.
    for request in [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                    b"{\"prompt\": "]:
        sock = socket.create_connection(server.server_address[:2], timeout=10)
        sock.sendall(request)
        time.sleep(0.2)  # the server is now waiting for the rest
        reset(sock)
    # A keep-alive connection reset after its request, while idle: that request's line only.
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    sock.sendall(b"GET /v1/models/tiny HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b"}"):  # the whole reply (headers and body may come apart)
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    reset(sock)
    assert call(server, "GET", "/health")[0] == 200  # still serving
    assert [line.split()[2] for line in log_lines(caplog, "/v1/models/tiny")] == ["200"]
    headers = log_lines(caplog, "/v1/chat/completions 499")
    body = log_lines(caplog, "/v1/completions 499")
    assert len(headers) == 1 and len(body) == 1, (headers, body)
    assert "client went away" in headers[0] and "client went away" in body[0]
    assert not [r for r in caplog.records if r.exc_info]
    assert "Traceback" not in capfd.readouterr().err


def test_backlog_option(server, capsys):
    assert server.request_queue_size == 128  # what server_activate passes to listen()
    assert main(["serve", "/nonexistent/run", "--backlog", "0"]) == 1
    assert capsys.readouterr().err == "error: --backlog must be >= 1, got 0\n"


def test_64_simultaneous_streams_are_all_answered(server):
    """A burst larger than http.server's default listen backlog (5): every stream completes."""
    clients, results = 64, {}
    start = threading.Barrier(clients)
    body = json.dumps({"messages": HELLO, "max_tokens": 3, "temperature": 0, "stream": True})

    def client(i: int) -> None:
        start.wait()
        try:
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            conn.request("POST", "/v1/chat/completions", body=body)
            response = conn.getresponse()
            results[i] = (response.status, events(response.read().decode())[-1])
            conn.close()
        except OSError as err:
            results[i] = (type(err).__name__, None)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, 90 - (time.perf_counter() - started)))
    failed = {i: r for i, r in results.items() if r != (200, "[DONE]")}
    assert len(results) == clients and not failed, failed


def fuzz_value(rng: random.Random, field: str):
    """A value for ``field``: in its range, at its edges, beyond them, or of the wrong type."""
    ranges = {"temperature": (0, 2), "top_p": (0, 1), "repetition_penalty": (1e-300, 10),
              "frequency_penalty": (-2, 2), "presence_penalty": (-2, 2), "top_k": (-1, 60),
              "seed": (-(2**63), 2**64 - 1), "max_tokens": (1, 4), "n": (1, 3)}
    low, high = ranges[field]
    odd = [None, True, "1", [], {}, float("nan"), float("inf"), float("-inf"), HUGE, -HUGE,
           1e308, -1e308, 5e-324, -0.0, 0, -1, 2**63, 2**64, 1.5, low, high]
    if rng.random() < 0.5:
        return rng.choice(odd)
    if isinstance(low, int) and isinstance(high, int):
        return rng.randint(low, high)
    return rng.uniform(low, high) * rng.choice([1, 1, 1e-30, 1e30])


def test_fuzzed_request_fields_never_give_a_500(server):
    rng = random.Random(13)
    fields = ["temperature", "top_p", "repetition_penalty", "frequency_penalty",
              "presence_penalty", "top_k", "seed", "max_tokens", "n"]
    seen = set()
    for i in range(200):
        body = {"messages": HELLO, "max_tokens": 2, "stream": rng.random() < 0.3}
        for field in rng.sample(fields, rng.randint(1, 4)):
            body[field] = fuzz_value(rng, field)
        if isinstance(body["max_tokens"], int) and not isinstance(body["max_tokens"], bool) \
                and body["max_tokens"] > 8:  # keep each generation short: only its check counts
            body["max_tokens"] = HUGE
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        if path == "/v1/completions":
            body = {"prompt": "hello", **{k: v for k, v in body.items() if k != "messages"}}
        status, _, answer = call(server, "POST", path, json.dumps(body).encode())
        seen.add(status)
        assert status in (200, 400), (body, answer)
        if status == 400:
            assert answer["error"]["type"] == "invalid_request_error", answer
        elif body["stream"]:
            chunks = events(answer)
            assert chunks[-1] == "[DONE]" and all("error" not in c for c in chunks[:-1]), body
    assert seen == {200, 400}  # both kinds of answer were exercised

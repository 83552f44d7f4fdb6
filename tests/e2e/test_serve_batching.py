"""``gptforge serve`` with continuous batching, over real HTTP on 127.0.0.1: concurrent requests
decoded together give exactly the replies they get one at a time, the bounded queue answers 429
with ``Retry-After``, ``--request-timeout`` gives 408 (queued) or a cut reply (running),
``/health`` reports the load and ``/metrics`` is valid Prometheus text with the right counts.

The model is a tiny random one with a wide initialisation, so that greedy continuations vary
(a narrow one repeats one character, which would hide a row reading another row's cache).
"""

from __future__ import annotations

import json
import re
import threading

import pytest

from gptforge.cli import main
from tests.e2e.test_serve import call, events, start_server
from tests.tiny_checkpoints import make_base

PROMPTS = ["h", "hello there", "I am fine, how are", "a", "the quick brown fox jumps over",
           "you? I"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("batching"), init_std=0.3)[0]


@pytest.fixture
def servers(ckpt):
    started = []

    def start(**kwargs):
        server = start_server(ckpt, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.close()


def hold_first_prefill(server, until):
    """Make the scheduler wait in its first prefill until ``until()`` holds (10 s at most)."""
    decoder, held = server.scheduler.decoder, threading.Event()
    real_prefill = decoder.prefill

    def prefill(*args):
        if not held.is_set():
            held.set()
            for _ in range(1000):
                if until():
                    break
                threading.Event().wait(0.01)
        return real_prefill(*args)

    decoder.prefill = prefill
    return held


def spy_decode(server) -> list[int]:
    """The number of rows of every decode step the server runs from now on."""
    decoder, sizes = server.scheduler.decoder, []
    real_decode = decoder.decode

    def decode(slots, tokens):
        sizes.append(len(slots))
        return real_decode(slots, tokens)

    decoder.decode = decode
    return sizes


def request_body(i: int) -> tuple[str, dict]:
    """Greedy text and chat requests of different prompt lengths and max_tokens, a seeded
    sampled one, and one with two choices."""
    body = {"max_tokens": 6 + 3 * i, "temperature": 0}
    if i == 2:
        body.update(temperature=1.0, top_p=0.9, seed=5)
    if i == 4:
        body["n"] = 2
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [
            {"role": "user", "content": PROMPTS[i]}]}
    return "/v1/completions", {**body, "prompt": PROMPTS[i]}


def texts(answer: dict) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in answer["choices"]]


def test_concurrent_requests_equal_the_same_requests_one_by_one(servers):
    server = servers(max_batch=8)
    sizes = spy_decode(server)
    alone = [call(server, "POST", *request_body(i))[2] for i in range(len(PROMPTS))]
    assert max(sizes) <= 2  # one request at a time (two rows for n = 2)
    sizes.clear()
    # All requests queued before the first is prefilled: they then run together.
    hold_first_prefill(server, lambda: server.scheduler.load()[0] >= len(PROMPTS) - 1)
    together: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, call(server, "POST", *request_body(i))[2])) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert max(sizes) == len(PROMPTS) + 1  # every row in one step (n = 2 takes two)
    for i, answer in enumerate(alone):
        assert texts(together[i]) == texts(answer), i
        assert together[i]["usage"] == answer["usage"]
        assert [c["finish_reason"] for c in together[i]["choices"]] == \
            [c["finish_reason"] for c in answer["choices"]]
    assert len({t for a in alone for t in texts(a)}) >= len(PROMPTS)  # varied replies
    # Batched: far fewer decode steps than tokens.
    tokens = sum(a["usage"]["completion_tokens"] for a in alone)
    assert len(sizes) < tokens / 3
    assert server.scheduler.load() == (0, 0, 0)


def test_a_full_queue_gets_429_with_retry_after(servers):
    server = servers(max_batch=1, max_queue=1)
    gate = threading.Event()
    real_decode = server.scheduler.decoder.decode
    server.scheduler.decoder.decode = lambda *a: (gate.wait(10), real_decode(*a))[1]
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        call(server, "POST", "/v1/completions", body)[0])) for _ in range(2)]
    try:
        threads[0].start()
        wait_for(lambda: server.scheduler.load()[1] == 1)  # the first one runs (held)
        threads[1].start()
        wait_for(lambda: server.scheduler.load()[0] == 1)  # the second one waits
        health = call(server, "GET", "/health")[2]
        assert health["queue_depth"] == 1 and health["active_requests"] == 1
        status, response, answer = call(server, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert status == 429 and int(response.getheader("Retry-After")) >= 1
        assert answer["error"]["code"] == "rate_limit_exceeded"
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert "--max-queue 1" in answer["error"]["message"]
    finally:
        gate.set()
        for thread in threads:
            thread.join(30)
    assert results == [200, 200]
    # n beyond the rows is a 400, not a request that can never start.
    status, _, answer = call(server, "POST", "/v1/completions", {**body, "n": 2})
    assert status == 400 and answer["error"]["param"] == "n"


def test_request_timeout(servers):
    """A request still queued when its time runs out gets 408; a running one ends cut, "length".

    One row, 0.5 s per request. The decode step is held (as a long step would be) until both the
    running and the queued request are past their time, then released: the scheduler's next
    turn cuts the one and refuses the other, whatever the machine's speed."""
    server = servers(max_batch=1, request_timeout=0.5)
    real_decode = server.scheduler.decoder.decode
    release, steps = threading.Event(), []

    def held_decode(*args):
        steps.append(1)
        if len(steps) >= 3:  # a few tokens out, then the step takes "long"
            release.wait(30)
        return real_decode(*args)

    server.scheduler.decoder.decode = held_decode
    results = {}

    def run(name, body):
        results[name] = call(server, "POST", "/v1/completions", body)

    threads = [threading.Thread(target=run, args=(name, body)) for name, body in (
        ("running", {"prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}),
        ("queued", {"prompt": "hi", "max_tokens": 2}))]
    threads[0].start()
    wait_for(lambda: len(steps) >= 3)
    threads[1].start()
    wait_for(lambda: server.scheduler.load()[0] == 1)
    threading.Event().wait(0.6)  # both are now past their 0.5 s
    release.set()
    for thread in threads:
        thread.join(30)
    status, _, answer = results["queued"]
    assert status == 408 and answer["error"]["code"] == "request_timeout"
    status, _, raw = results["running"]
    chunks = events(raw)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert 1 <= len("".join(c["choices"][0]["text"] for c in chunks[:-1])) < 40


SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]+="[^"\\\n]*"'
                    r'(?:,[a-zA-Z_]+="[^"\\\n]*")*\})? (-?[0-9.e+-]+|\+Inf|NaN)')


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """{family: {labels: value}} from Prometheus text, checked line by line: every sample
    belongs to the family its # TYPE line announced, every family has HELP and TYPE."""
    families, kinds, current = {}, {}, None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            assert current not in families, f"family {current} twice"
            families[current] = {}
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and kind in ("counter", "gauge", "histogram"), line
            kinds[name] = kind
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        suffixes = ("_bucket", "_sum", "_count") if kinds[current] == "histogram" else ("",)
        assert any(name == current + s for s in suffixes), (name, current)
        families[current][name.removeprefix(current) + (labels or "")] = float(value)
    assert set(kinds) == set(families)
    return families


def scrape_when_counted(server, n: int, headers=None) -> str:
    """``GET /metrics`` once it counts ``n`` requests besides its own scrapes. A request is
    counted when its handler finishes, just after the client has its answer (so that its
    duration includes sending it): a scrape right after a response may precede its count."""
    scrapes = []

    def counted() -> bool:
        scrapes.append(call(server, "GET", "/metrics", headers=headers)[2])
        requests = parse_metrics(scrapes[-1]).get("gptforge_requests_total", {})
        return sum(v for k, v in requests.items() if k != '{route="/metrics",status="200"}') >= n

    wait_for(counted)
    return scrapes[-1]


def test_metrics_are_prometheus_text_with_the_right_counts(servers):
    server = servers(api_key="k")
    key = {"Authorization": "Bearer k"}
    usages = [call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": m,
                                                       "temperature": 0}, headers=key)[2]["usage"]
              for m in (3, 5)]
    call(server, "POST", "/v1/completions", {"prompt": "hi", "top_p": 9}, headers=key)
    assert call(server, "GET", "/metrics")[0] == 401
    status, response, text = call(server, "GET", "/metrics", headers=key)
    assert status == 200 and response.getheader("Content-Type").startswith("text/plain")
    text = scrape_when_counted(server, 4, headers=key)
    metrics = parse_metrics(text)
    requests = metrics["gptforge_requests_total"]
    assert requests['{route="/v1/completions",status="200"}'] == 2
    assert requests['{route="/v1/completions",status="400"}'] == 1
    assert requests['{route="/metrics",status="401"}'] == 1
    assert metrics["gptforge_completion_tokens_total"][""] == sum(
        u["completion_tokens"] for u in usages)
    assert metrics["gptforge_prompt_tokens_total"][""] == sum(u["prompt_tokens"] for u in usages)
    assert metrics["gptforge_queue_depth"][""] == 0 and metrics["gptforge_slots"][""] == 16
    for family in ("gptforge_request_duration_seconds", "gptforge_time_to_first_token_seconds"):
        buckets = [v for k, v in metrics[family].items() if k.startswith("_bucket")]
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] == metrics[family]["_count"] == 2
        assert '_bucket{le="+Inf"}' in metrics[family]


def test_metrics_read_by_prometheus_client(servers):
    """A second reader, the official one, where it is installed."""
    parser = pytest.importorskip("prometheus_client.parser")
    server = servers()
    call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    families = {f.name: f for f in parser.text_string_to_metric_families(
        scrape_when_counted(server, 1))}
    assert families["gptforge_request_duration_seconds"].type == "histogram"
    assert families["gptforge_completion_tokens"].samples[0].value == 2


def test_serve_options_are_checked(capsys):
    for args, words in [(["--max-batch", "0"], "--max-batch must be >= 1"),
                        (["--request-timeout", "0"], "--request-timeout must be a positive"),
                        (["--request-timeout", "nan"], "--request-timeout must be a positive")]:
        assert main(["serve", "/nonexistent/run", *args]) == 1
        assert words in capsys.readouterr().err


def wait_for(condition, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached")


def test_health_reports_the_load(servers):
    server = servers(max_batch=4)
    assert json.loads(json.dumps(call(server, "GET", "/health")[2])) == {
        "status": "ok", "model": "tiny", "queue_depth": 0, "active_requests": 0,
        "active_slots": 0, "slots": 4}


def test_a_failing_step_is_a_500_and_the_server_goes_on(servers, caplog):
    server = servers()
    decoder = server.scheduler.decoder
    real_decode = decoder.decode

    def broken(*args):
        decoder.decode = real_decode  # once
        raise RuntimeError("a bug")

    decoder.decode = broken
    body = {"prompt": "hello", "max_tokens": 5, "temperature": 0}
    status, _, answer = call(server, "POST", "/v1/completions", body)
    assert status == 500 and answer["error"]["type"] == "server_error"
    assert "a bug" not in json.dumps(answer)  # the traceback stays in the log
    assert call(server, "POST", "/v1/completions", body)[0] == 200
    assert server.scheduler.load() == (0, 0, 0)

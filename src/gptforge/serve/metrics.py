"""The server's counters, written at ``GET /metrics`` in Prometheus' text exposition format.

The format (https://prometheus.io/docs/instrumenting/exposition_formats/) is lines of
``name{label="value"} number``, each family introduced by ``# HELP`` and ``# TYPE`` lines.
Counters only grow (their names end in ``_total``); gauges are read when scraped; a histogram
counts observations per cumulative bucket ``le`` (less than or equal), plus their ``_sum`` and
``_count``, so Prometheus can compute quantiles over any window (``histogram_quantile``). Written
by hand, without the ``prometheus_client`` package: the server depends on the standard library
only.
"""

from __future__ import annotations

import bisect
import threading

# Seconds, for request latency and time to first token (small models on a CPU answer in ms).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """Thread-safe: request threads and the scheduler thread record, ``/metrics`` renders."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (route, status): count
        self.prompt_tokens = self.completion_tokens = 0
        self.latency = Histogram()  # seconds from arrival to the last byte, answered requests
        self.first_token = Histogram()  # seconds from arrival to the first sampled token

    def request(self, route: str, status: int, seconds: float | None,
                tokens: tuple[int, int] | None) -> None:
        """A finished request: ``seconds`` and ``tokens`` (prompt, completion) for generations."""
        with self._lock:
            key = (route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if tokens is not None:
                self.prompt_tokens += tokens[0]
                self.completion_tokens += tokens[1]
            if seconds is not None:
                self.latency.observe(seconds)

    def first_token_after(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def render(self, queued: int, active_requests: int, active_rows: int, slots: int) -> str:
        with self._lock:
            lines = _family("gptforge_requests_total", "counter",
                            "HTTP requests answered, by route and status")
            lines += [f'gptforge_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            for name, value, what in [
                    ("prompt_tokens_total", self.prompt_tokens, "prompt tokens of generations"),
                    ("completion_tokens_total", self.completion_tokens,
                     "tokens generated (all choices)")]:
                lines += _family(f"gptforge_{name}", "counter", what)
                lines.append(f"gptforge_{name} {value}")
            for name, value, what in [
                    ("queue_depth", queued, "requests waiting for a slot"),
                    ("active_requests", active_requests, "requests being generated"),
                    ("active_slots", active_rows, "KV cache rows in use (n rows per request)"),
                    ("slots", slots, "KV cache rows (--max-batch)")]:
                lines += _family(f"gptforge_{name}", "gauge", what)
                lines.append(f"gptforge_{name} {value}")
            lines += _family("gptforge_request_duration_seconds", "histogram",
                             "seconds from a generation request's arrival to its last byte")
            lines += self.latency.lines("gptforge_request_duration_seconds")
            lines += _family("gptforge_time_to_first_token_seconds", "histogram",
                             "seconds from a generation request's arrival to its first token")
            lines += self.first_token.lines("gptforge_time_to_first_token_seconds")
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

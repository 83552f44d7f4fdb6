"""The HTTP side of ``gptforge serve``, on the standard library's ``http.server``.

Routes: ``GET /`` (the web chat page, ``static/chat.html``; no key needed, it holds no data and
its API calls send the key), ``GET /health`` (no key needed, for probes: status, queue depth,
running requests), ``GET /metrics`` (Prometheus text format, ``metrics.py``), ``GET /v1/models`` and
``/v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``. Every error is
OpenAI's error JSON with its status; a bug is a 500 whose traceback goes to the server log only.
Each request is logged in one line: method, path, status, tokens (prompt+completion), seconds.

Concurrency: a ``ThreadingHTTPServer`` gives each connection a thread, and one scheduler thread
owns the model (``scheduler.py``): it decodes all running requests together, up to
``max_batch`` KV cache rows, and a request joins or leaves between two decode steps (continuous
batching). Requests are checked and tokenized before they queue, so bad ones are answered at
once; at most ``max_queue`` wait for a row, more get 429 with ``Retry-After``. The request's
thread passes the pieces the scheduler produces on to its client, at the client's reading pace;
a client that stops reading for ``RequestHandler.timeout`` seconds is dropped.

Streaming is Server-Sent Events (``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``) over
HTTP/1.1 chunked transfer encoding, so the connection stays usable afterwards (an HTTP/1.0 client
gets an HTTP/1.0 reply whose body ends where the connection closes). Before each step the
scheduler checks whether each client has closed its connection; if one has, its request stops
there (streamed and whole replies alike, queued ones too) and is logged with status 499.
Shutting down (:meth:`ModelServer.close`) stops every generation the same way, then closes the
open connections and waits for their threads.

Load: the listening socket queues up to ``backlog`` (default 128) connections not yet accepted;
http.server's default of 5 made bursts of a few dozen simultaneous clients lose connections.
A client that resets its connection at any point costs one log line, never a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import select
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from gptforge import __version__
from gptforge.inference.textgen import TextGenerator
from gptforge.serve import protocol
from gptforge.serve.completion import Generation, prepare
from gptforge.serve.metrics import Metrics
from gptforge.serve.protocol import ApiError
from gptforge.serve.scheduler import Scheduler, Ticket

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20
BACKLOG = 128  # connections the kernel queues before they are accepted (capped by somaxconn)
MAX_BATCH = 16  # KV cache rows decoded together (>= protocol.MAX_CHOICES: any n fits)
MAX_QUEUE = 128  # requests waiting for a row before more get 429
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
CLIENT_CLOSED = 499  # nginx's status for a request the client gave up on (logged, never sent)
ROUTES = {  # path: (method, handler method)
    "/": ("GET", "_page"),
    "/health": ("GET", "_health"),
    "/metrics": ("GET", "_metrics"),
    "/v1/models": ("GET", "_models"),
    "/v1/chat/completions": ("POST", "_chat"),
    "/v1/completions": ("POST", "_completions"),
}

KEYLESS = {"/health", "/"}  # routes answered without the API key


class ModelServer(ThreadingHTTPServer):
    """Serves one :class:`TextGenerator` under ``model_name``; ``api_key``: required bearer key.

    ``max_batch``: KV cache rows decoded together; ``max_queue``: requests that may wait for
    one; ``request_timeout``: seconds a request may take from its arrival (None: no limit).
    Port 0 picks a free port (see :attr:`url`). Run it with ``serve_forever()``; after
    ``shutdown()`` (or an interrupt), :meth:`close` it."""

    daemon_threads = True  # a connection never holds up exit (close() joins the threads)

    def __init__(self, generator: TextGenerator, host: str = "127.0.0.1", port: int = 8000, *,
                 model_name: str, api_key: str | None = None, backlog: int = BACKLOG,
                 max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 request_timeout: float | None = None):
        self.generator, self.model_name, self.api_key = generator, model_name, api_key
        self.request_queue_size = backlog  # read by server_activate's listen()
        self.stopping = threading.Event()  # set at shutdown: every generation stops
        self._connections: dict[socket.socket, threading.Thread] = {}  # open ones, for close()
        self._connections_lock = threading.Lock()
        self.created = int(time.time())
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), RequestHandler)  # may fail: then no thread was started
        self.metrics = Metrics()
        self.scheduler = Scheduler(generator, max_batch=max_batch, max_queue=max_queue,
                                   request_timeout=request_timeout, metrics=self.metrics)

    def process_request_thread(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)

    def handle_error(self, request, client_address) -> None:
        """An exception that escaped the handler: one log line for a client that went away,
        the traceback (in the log, not on stderr) for anything else."""
        err = sys.exc_info()[1]
        if isinstance(err, CLIENT_GONE):
            log.info("- - %s (client went away: %s)", CLIENT_CLOSED, type(err).__name__)
        else:
            log.exception("internal error on the connection from %s", client_address[0])

    def close(self, timeout: float = 10.0) -> None:
        """Shut down after ``serve_forever`` has returned: stop listening, end the generations
        under way at their next token, close the open (keep-alive) connections and wait up to
        ``timeout`` seconds for their threads, so that none is left running at exit."""
        self.server_close()
        self.stopping.set()
        self.scheduler.close(timeout)
        with self._connections_lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting for the next request
            except OSError:  # closed meanwhile
                pass
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _readable_now(sock: socket.socket) -> bool:
    """Whether a read from ``sock`` would return at once (poll has no limit on descriptor
    numbers, unlike select's 1024; Windows has only select)."""
    if not hasattr(select, "poll"):
        return bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class RequestHandler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer encoding for streams
    server_version = f"gptforge/{__version__}"
    timeout = 60  # seconds a socket read or write may wait: idle or stalled clients are dropped

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    do_HEAD = do_GET  # HEAD of a GET route: its headers without the body
    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET  # answered with 404 or 405

    def handle_one_request(self) -> None:
        """http.server's, except that a client resetting the connection while the request line
        or headers are read (before :meth:`_dispatch` logs the request) costs one log line."""
        self.command, self.dispatched = None, False
        try:
            super().handle_one_request()
        except CLIENT_GONE as err:
            self.close_connection = True
            if self.command is None:  # an idle keep-alive connection reset: no request to log
                log.debug("%s reset an idle connection", self.address_string())
            elif not self.dispatched:  # else _dispatch has logged the request
                log.info("%s %s %s (client went away: %s)", self.command, self.path,
                         CLIENT_CLOSED, type(err).__name__)

    def _dispatch(self) -> None:
        started = time.perf_counter()
        self.status, self.tokens, self.note, self.dispatched = 0, "", "", True
        self.generation: Generation | None = None
        if self.request_version == "HTTP/1.0":
            # Reply in HTTP/1.0: no chunked encoding, and a streamed body ends at the close.
            self.protocol_version, self.close_connection = "HTTP/1.0", True
        try:
            self._route()
        except ApiError as err:
            self._send_error(err)
        except CLIENT_GONE:
            self._client_went_away()
        except Exception:  # a bug: the traceback stays in the server log
            log.exception("internal error answering %s %s", self.command, self.path)
            self._send_error(ApiError(500, "internal server error (the server log has the "
                                           "details)", type="server_error"))
        finally:
            seconds = time.perf_counter() - started
            log.info("%s %s %s%s %.2f s%s", self.command, self._path(), self.status,
                     f" {self.tokens} tokens" if self.tokens else "", seconds, self.note)
            self._record(seconds)

    def _record(self, seconds: float) -> None:
        """Count the request in the metrics (by route: unknown paths are one "other" route)."""
        path = self._path()
        route = "/v1/models/{id}" if path.startswith("/v1/models/") else \
            path if path in ROUTES else "other"
        generation = self.generation
        tokens = None if generation is None else (generation.prompt_tokens,
                                                  generation.completion_tokens)
        answered = generation is not None and self.status == 200
        self.server.metrics.request(route, self.status, seconds if answered else None, tokens)

    def _route(self) -> None:
        path = self._path()
        if path.startswith("/v1/models/"):
            method, name = "GET", "_model"
        elif path in ROUTES:
            method, name = ROUTES[path]
        else:
            raise ApiError(404, f"Invalid URL ({self.command} {path})", code="not_found")
        if path not in KEYLESS:
            self._check_key()
        allowed = "GET, HEAD" if method == "GET" else method
        if self.command not in allowed.split(", "):
            raise ApiError(405, f"{path} takes {allowed.replace(', ', ' or ')}, not "
                                f"{self.command}", code="method_not_allowed",
                           headers={"Allow": allowed})
        getattr(self, name)()

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: "
                                "Bearer KEY' with the key given to gptforge serve --api-key",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- routes ------------------------------------------------------------------------------

    def _page(self) -> None:
        page = resources.files("gptforge.serve").joinpath("static/chat.html").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Content-Security-Policy", "default-src 'self'; "
                                                    "style-src 'unsafe-inline'; "
                                                    "script-src 'unsafe-inline'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(page)
        self.status = 200

    def _health(self) -> None:
        queued, running, rows = self.server.scheduler.load()
        self._send_json(200, {"status": "ok", "model": self.server.model_name,
                              "queue_depth": queued, "active_requests": running,
                              "active_slots": rows, "slots": self.server.scheduler.max_batch})

    def _metrics(self) -> None:
        scheduler = self.server.scheduler
        text = self.server.metrics.render(*scheduler.load(), scheduler.max_batch)
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.status = 200

    def _models(self) -> None:
        model = protocol.model_object(self.server.model_name, self.server.created)
        self._send_json(200, {"object": "list", "data": [model]})

    def _model(self) -> None:
        name = self._path().removeprefix("/v1/models/")
        self._check_model(name)
        self._send_json(200, protocol.model_object(self.server.model_name, self.server.created))

    def _chat(self) -> None:
        self._complete(protocol.parse_chat_request(self._read_json()), "chatcmpl")

    def _completions(self) -> None:
        self._complete(protocol.parse_text_request(self._read_json()), "cmpl")

    def _complete(self, request: protocol.GenerationRequest, id_prefix: str) -> None:
        self._check_model(request.model)
        job = prepare(self.server.generator, request)  # bad prompts are refused before waiting
        head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.server.model_name}
        generation = Generation(self.server.generator, job, is_cancelled=self._client_gone)
        ticket = self.server.scheduler.submit(generation)  # 429 if the queue is full
        self.generation = generation
        try:
            if not ticket.wait_admitted():  # 408 if its time ran out in the queue
                self._client_went_away()
            elif request.stream:
                self._stream(ticket, head)
            else:
                self._answer(ticket, head)
        finally:
            ticket.abandon()  # its rows are freed at the next step if it is still running
            if ticket.timed_out:
                self.note = " (timed out)"

    def _answer(self, ticket: Ticket, head: dict) -> None:
        generation = ticket.generation
        for _ in ticket.deltas():
            pass
        self._count(generation)
        if generation.cancelled:
            self._client_went_away()
            return
        usage = protocol.usage(generation.prompt_tokens, generation.completion_tokens)
        logprobs = [generation.logprobs_body(i) for i in range(len(generation.texts))]
        self._send_json(200, protocol.response_body(generation.job.request.kind, head,
                                                    generation.texts,
                                                    generation.finish_reasons, usage,
                                                    generation.reasonings,
                                                    generation.tool_calls, logprobs))

    def _stream(self, ticket: Ticket, head: dict) -> None:
        generation = ticket.generation
        request = generation.job.request
        kind, with_usage = request.kind, request.include_usage
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.status = 200
        try:
            if kind == "chat":  # the role first, as OpenAI sends it
                for i in range(request.n):
                    self._event(protocol.chunk_body(kind, head, i, role=True,
                                                    include_usage=with_usage))
            for delta in ticket.deltas():
                if delta.text or delta.reasoning or delta.tool_calls or delta.logprobs:
                    self._event(protocol.chunk_body(kind, head, delta.index,
                                                    text=delta.text or None,
                                                    reasoning=delta.reasoning,
                                                    tool_calls=list(delta.tool_calls),
                                                    include_usage=with_usage,
                                                    logprobs=generation.delta_logprobs(delta)))
                if delta.finish_reason:
                    self._event(protocol.chunk_body(kind, head, delta.index,
                                                    finish_reason=delta.finish_reason,
                                                    include_usage=with_usage))
            if generation.cancelled:  # the stream stays unfinished: the reply is not whole
                self._client_went_away()
                return
            if with_usage:
                usage = protocol.usage(generation.prompt_tokens, generation.completion_tokens)
                self._event(protocol.usage_chunk_body(kind, head, usage))
            self._write_chunk(b"data: [DONE]\n\n")
            if self._chunked:
                self._write_chunk(b"")  # the end of a chunked body
        except CLIENT_GONE:
            self._client_went_away()
        except Exception:  # a bug mid-stream: the status is sent, so say it in the stream
            log.exception("internal error while streaming %s", self._path())
            self.status, self.close_connection = 500, True
            self._event(ApiError(500, "internal server error (the server log has the "
                                      "details)", type="server_error").body())
        finally:
            self._count(generation)

    # -- I/O -----------------------------------------------------------------------------------

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length header (chunked request "
                                "bodies are not supported)")
        length = self._content_length()
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread: this connection is done
            raise ApiError(413, f"the request body ({length} bytes) is larger than the "
                                f"{MAX_BODY_BYTES // 2**20} MiB this server accepts",
                           code="request_too_large")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _content_length(self) -> int:
        """The body's length from its one Content-Length header: 411 if there is none, 400 if it
        is not a plain decimal number (-1, 1e3, two different values: RFC 9110 section 8.6)."""
        values = {v.strip() for v in self.headers.get_all("Content-Length", [])}
        if not values:
            self.close_connection = True
            raise ApiError(411, "a POST needs a Content-Length header")
        if len(values) > 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(values))):
            self.close_connection = True  # where the body ends is unknown
            raise ApiError(400, "Content-Length must be one non-negative decimal number of "
                                f"bytes (at most 18 digits), got "
                                f"{', '.join(sorted(values))[:60]!r}")
        return int(next(iter(values)))

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.server.model_name:
            raise ApiError(404, f"The model '{name}' does not exist: this server serves "
                                f"'{self.server.model_name}'", param="model",
                           code="model_not_found")

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.status = status

    def _send_error(self, err: ApiError) -> None:
        self.note = f" ({err.message[:120]})"  # for the log line
        try:
            self._send_json(err.status, err.body(), err.headers)
        except CLIENT_GONE:
            self._client_went_away()

    def _event(self, body: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """``data`` as one chunk (HTTP/1.1), or as it is (HTTP/1.0: the body ends at the close)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    @property
    def _chunked(self) -> bool:
        return self.protocol_version == "HTTP/1.1"

    def _client_gone(self) -> bool:
        """Whether the client has closed its connection (it sends nothing while it waits), or
        the server is shutting down. Asked from the scheduler's thread while this one may be
        writing, so the socket's own timeout is left alone: select says whether a peek returns
        at once (with data, or with b"" at the end of the stream)."""
        if self.server.stopping.is_set():
            return True
        sock = self.connection
        try:
            return _readable_now(sock) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or closed by this thread meanwhile (fd -1)
            return True

    def _client_went_away(self) -> None:
        self.status, self.close_connection = CLIENT_CLOSED, True
        self.note = " (server shutting down)" if self.server.stopping.is_set() \
            else " (client went away)"

    def _count(self, generation: Generation) -> None:
        self.tokens = f"{generation.prompt_tokens}+{generation.completion_tokens}"

    # -- http.server hooks -------------------------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """Errors http.server itself answers (a malformed request line, headers too long), as
        JSON like every other error."""
        self.close_connection = True
        try:
            self._send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())
        except OSError:
            return
        log.info("%s %s %s", self.command or "-", self.path if self.command else "-", code)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)

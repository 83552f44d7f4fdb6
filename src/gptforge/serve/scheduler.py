"""The server's scheduler: one thread owns the model and decodes every running request together.

Request threads :meth:`Scheduler.submit` a :class:`~gptforge.serve.completion.Generation` and
read its pieces from a :class:`Ticket`. Each turn of the scheduler's loop:

1. drops the requests whose client went away or whose time (``request_timeout``) is up;
2. admits waiting requests, oldest first, while there are free slots (KV cache rows; a request
   with ``n`` choices takes ``n``): its prompt is prefilled into the free slot that already holds
   the longest beginning of it (a chat re-sending its conversation prefills only the new turn);
3. samples one token for every running request from its logits, each with its own settings and
   seeded generator (:class:`~gptforge.inference.engine.SequenceSampler`), turns them into text
   pieces for the request's thread, and frees the slots of a request that has finished;
4. runs one decode step for all remaining rows together
   (:class:`~gptforge.inference.batching.BatchDecoder`), giving each its next logits.

So a request joins at the next step and leaves as soon as it is done: continuous batching (Orca,
Yu et al., 2022). At most ``max_queue`` requests wait for a slot; beyond that :meth:`submit`
answers 429 with ``Retry-After``. A request still waiting when its time is up gets 408; one
being generated ends there with the text so far and ``finish_reason`` "length", like a reply cut
by max_tokens (docs/serving.md).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque

import torch

from gptforge.inference.batching import BatchDecoder
from gptforge.inference.engine import SequenceSampler
from gptforge.inference.textgen import TextGenerator
from gptforge.serve.completion import Delta, Generation
from gptforge.serve.metrics import Metrics
from gptforge.serve.protocol import ApiError

log = logging.getLogger(__name__)

ADMITTED = "admitted"  # the first event of an admitted ticket; then lists of deltas; None: done


class Ticket:
    """A submitted request, as its thread sees it: wait for admission, then read the deltas."""

    def __init__(self, generation: Generation, timeout: float | None):
        self.generation = generation
        self.arrived = time.monotonic()
        self.deadline = None if timeout is None else self.arrived + timeout
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False  # set by the request's thread: free the slots, send nothing more
        self.timed_out = False
        # The scheduler's side:
        self.slots: list[int] = []
        self.sampler: SequenceSampler | None = None
        self.logits: torch.Tensor | None = None  # (n, V): the next tokens are sampled from these
        self.steps = 0

    def wait_admitted(self) -> bool:
        """Block until the request has slots (True) or was dropped unstarted (False: its client
        left or the server is stopping); :class:`ApiError` 408 if its time ran out waiting."""
        event = self.events.get()
        if isinstance(event, ApiError):
            raise event
        return event == ADMITTED

    def deltas(self):
        """The text pieces in order, until the generation has ended (or was stopped);
        :class:`ApiError` 500 if the scheduler failed."""
        while (event := self.events.get()) is not None:
            if isinstance(event, ApiError):
                raise event
            yield from event

    def abandon(self) -> None:
        self.abandoned = True


class Scheduler:
    """Decodes the requests of ``generator``'s model in batches of up to ``max_batch`` rows."""

    def __init__(self, generator: TextGenerator, *, max_batch: int, max_queue: int,
                 request_timeout: float | None, metrics: Metrics):
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.request_timeout, self.metrics = request_timeout, metrics
        self.decoder = BatchDecoder(generator.engine, max_batch)
        self.free = list(range(max_batch))
        self.waiting: deque[Ticket] = deque()
        self.active: list[Ticket] = []
        self._cond = threading.Condition()
        self._closing = False
        self._mean_seconds = 1.0  # of finished requests (for Retry-After), moving average
        self._thread = threading.Thread(target=self._run, name="gptforge-scheduler", daemon=True)
        self._thread.start()

    # -- request threads ---------------------------------------------------------------------

    def submit(self, generation: Generation) -> Ticket:
        """Queue ``generation``; 429 if ``max_queue`` requests are waiting already."""
        n = generation.job.request.n
        if n > self.max_batch:
            raise ApiError(400, f"n ({n}) must be <= {self.max_batch}, the rows this server "
                                "decodes together (gptforge serve --max-batch)", param="n")
        ticket = Ticket(generation, self.request_timeout)
        with self._cond:
            # Free rows take the first waiting requests at the next step: they do not queue.
            if len(self.waiting) >= self.max_queue + len(self.free):
                retry = max(1, math.ceil(self._mean_seconds))
                raise ApiError(429, f"the server is busy: {len(self.waiting)} requests are "
                                    f"waiting already (--max-queue {self.max_queue}); retry in "
                                    f"{retry} s", type="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": str(retry)})
            self.waiting.append(ticket)
            self._cond.notify()
        return ticket

    def load(self) -> tuple[int, int, int]:
        """(requests waiting, requests running, rows in use) at this moment."""
        with self._cond:
            return len(self.waiting), len(self.active), self.max_batch - len(self.free)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still queued or running end unstarted / cut)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.active or self._closing):
                    self._cond.wait()
                if self._closing:
                    break
            try:
                self._turn()
            except Exception:  # a bug: fail the requests under way, keep serving the others
                log.exception("internal error in the scheduler; its requests are ended")
                for ticket in list(self.active):
                    ticket.events.put(_internal_error())
                    self._release(ticket)
        for ticket in list(self.active):  # closing: everything under way ends here, unfinished
            ticket.generation.cancelled = True
            self._release(ticket)
        with self._cond:
            waiting, self.waiting = list(self.waiting), deque()
        for ticket in waiting:
            ticket.events.put(None)

    def _turn(self) -> None:
        self._sweep()
        self._admit()
        if self.active:
            self._step()

    def _sweep(self) -> None:
        """Drop requests whose client left, whose thread gave up, or whose time is up."""
        now = time.monotonic()
        with self._cond:
            waiting = list(self.waiting)
        for ticket in waiting + self.active:
            expired = ticket.deadline is not None and now > ticket.deadline
            if not (ticket.abandoned or ticket.generation.stop_asked() or expired):
                continue
            if ticket in self.active:
                if expired and not ticket.generation.cancelled:
                    ticket.timed_out = True
                    ticket.events.put(ticket.generation.end("length"))
                self._release(ticket)
                continue
            with self._cond:
                self.waiting.remove(ticket)
            if expired and not ticket.generation.cancelled:
                ticket.timed_out = True
                ticket.events.put(ApiError(
                    408, f"the request waited {now - ticket.arrived:.1f} s for a free slot, "
                         f"longer than this server allows (--request-timeout "
                         f"{self.request_timeout:g}); retry later", type="timeout_error",
                    code="request_timeout"))
            else:
                ticket.events.put(None)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self.waiting or self.waiting[0].generation.job.request.n > len(self.free):
                    return
                ticket = self.waiting.popleft()
            try:
                self._start(ticket)
            except Exception:  # a bug: this request gets a 500, the others go on
                log.exception("internal error starting a request")
                self.free = sorted(set(self.free) | set(ticket.slots))
                ticket.events.put(_internal_error())

    def _start(self, ticket: Ticket) -> None:
        """Prefill the ticket's prompt into its slots and make it a running request."""
        job = ticket.generation.job
        n = job.request.n
        first = self.decoder.best_slot(self.free, job.prompt)
        self.free.remove(first)
        ticket.slots = [first] + [self.free.pop(0) for _ in range(n - 1)]
        logits = self.decoder.prefill(first, job.prompt)
        for slot in ticket.slots[1:]:
            self.decoder.copy(first, slot)
        ticket.logits = logits.expand(n, -1)
        ticket.sampler = SequenceSampler(job.prompt, n, job.settings,
                                         ticket.generation.banned_ids, logits.size(-1),
                                         logits.device)
        self.active.append(ticket)
        ticket.events.put(ADMITTED)
        generation = ticket.generation
        deltas = generation.start()  # echo: the prompt comes first
        if job.settings.max_new_tokens == 0:  # echo alone: only the prompt is scored
            deltas += generation.end("length")
        if deltas:
            ticket.events.put(deltas)
        if generation.finished:
            self._release(ticket)

    def _step(self) -> None:
        """Sample a token for every running request, then decode the rows still running."""
        rows: list[tuple[int, Ticket, int]] = []  # (slot, ticket, its choice), to decode
        tokens: dict[int, torch.Tensor] = {}
        for ticket in list(self.active):
            ids = ticket.sampler.sample(ticket.logits)
            if self._advance(ticket, ids.tolist()):
                rows += [(slot, ticket, j) for j, slot in enumerate(ticket.slots)]
                tokens[id(ticket)] = ids
        if not rows:
            return
        rows.sort(key=lambda row: row[0])  # slots in order: contiguous ones are read as views
        fed = torch.stack([tokens[id(ticket)][j] for _, ticket, j in rows])
        logits = self.decoder.decode([slot for slot, _, _ in rows], fed)
        by_ticket: dict[int, list[int]] = {}
        for i, (_, ticket, j) in enumerate(rows):
            by_ticket.setdefault(id(ticket), [0] * len(ticket.slots))[j] = i
        for ticket in self.active:
            ticket.logits = logits[by_ticket[id(ticket)]]

    def _advance(self, ticket: Ticket, ids: list[int]) -> bool:
        """Pass the ticket's new tokens on; False once it has finished (its slots are free)."""
        generation = ticket.generation
        if ticket.steps == 0:
            self.metrics.first_token_after(time.monotonic() - ticket.arrived)
        ticket.steps += 1
        deltas: list[Delta] = generation.push(ids)
        if not generation.finished and ticket.steps >= generation.job.settings.max_new_tokens:
            deltas += generation.end("length")
        if deltas:
            ticket.events.put(deltas)
        if generation.finished:
            self._release(ticket)
            return False
        return True

    def _release(self, ticket: Ticket) -> None:
        """Free the ticket's slots (they keep their tokens for a later prompt) and end it."""
        self.active.remove(ticket)
        with self._cond:
            self.free = sorted(self.free + ticket.slots)
        seconds = time.monotonic() - ticket.arrived
        self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * seconds
        ticket.events.put(None)


def _internal_error() -> ApiError:
    return ApiError(500, "internal server error (the server log has the details)",
                    type="server_error")

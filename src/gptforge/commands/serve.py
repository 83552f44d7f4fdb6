"""``gptforge serve``: answer OpenAI-style chat and completion requests over HTTP (docs/serving.md).

Ctrl-C or SIGTERM stops the server (exit code 0); a reply being generated ends at its next token.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API: /v1/chat/completions, "
                    "/v1/completions, /v1/models, /health, /metrics. Concurrent requests are "
                    "decoded together (continuous batching); see docs/serving.md.")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 "
                        "opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step at start-up (20-30 s): faster replies")
    p.add_argument("--api-key", default=os.environ.get("GPTFORGE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $GPTFORGE_API_KEY; "
                        "none: no key needed)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in the API (default: the checkpoint directory's name)")
    p.add_argument("--backlog", type=int, default=128, metavar="N",
                   help="connections the kernel queues before they are accepted (default: 128); "
                        "raise it for larger bursts of simultaneous clients")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: weight-only int8 linear layers, about 4x smaller than float32 "
                        "(not with --compile)")
    p.add_argument("--max-batch", type=int, default=16, metavar="B",
                   help="requests' rows decoded together (KV cache rows; default: 16); "
                        "1 = one generation at a time")
    p.add_argument("--max-queue", type=int, default=128, metavar="Q",
                   help="requests that may wait for a free row; more get 429 (default: 128)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="seconds a request may take: still queued then, it gets 408; being "
                        "generated, it ends with finish_reason 'length' (default: no limit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import gptforge
    from gptforge.errors import GptforgeError
    from gptforge.inference.sampling import SamplingSettings
    from gptforge.serve.server import ModelServer

    if not 0 <= args.port <= 65535:
        raise GptforgeError(f"--port must be between 0 and 65535, got {args.port}")
    if args.backlog < 1:
        raise GptforgeError(f"--backlog must be >= 1, got {args.backlog}")
    if args.max_batch < 1 or args.max_queue < 0:
        raise GptforgeError(f"--max-batch must be >= 1 and --max-queue >= 0, got "
                            f"{args.max_batch} and {args.max_queue}")
    timeout = args.request_timeout
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise GptforgeError(f"--request-timeout must be a positive number of seconds, got "
                            f"{timeout}")
    generator = gptforge.load(args.checkpoint, device=args.device, compile=args.compile)
    generator = gptforge.load(args.checkpoint, device=args.device, compile=args.compile,
                              quantize=args.quantize)
    if args.compile:  # compile now rather than in the first request
        log.info("compiling the decode step (20-30 s, once)")
        warm_up = SamplingSettings(max_new_tokens=3, temperature=0)
        for _ in generator.engine.generate([generator.tokenizer.eos_id], warm_up):  # no stops
            pass
    name = args.model_name or Path(args.checkpoint).resolve().name
    try:
        server = ModelServer(generator, args.host, args.port, model_name=name,
                             api_key=args.api_key or None, backlog=args.backlog,
                             max_batch=args.max_batch, max_queue=args.max_queue,
                             request_timeout=timeout)
    except OSError as err:
        raise GptforgeError(f"cannot listen on {args.host}:{args.port}: "
                            f"{err.strerror or err}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use "
                    "the model (docs/serving.md, Security)", args.host)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        log.info("serving %r on %s (OpenAI base URL %s/v1)%s; Ctrl-C to stop", name, server.url,
                 server.url, "" if args.api_key else ", no API key")
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()  # a reply under way ends at its next token; connections are closed
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does

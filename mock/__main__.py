"""Run the mock LLM backend on its own: ``python -m ntonix_mock --port 8001 --id a``."""

import argparse
import sys
from typing import List, Optional

from twisted.internet import endpoints
from twisted.logger import globalLogBeginner, textFileLogObserver

from ntonix_mock.server import Knobs, make_site


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ntonix-mock", description=__doc__)
    p.add_argument("--port", type=int, default=8001, help="listening port (default 8001)")
    p.add_argument("--bind", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--id", default="mock", help="backend id, sent as X-Backend-Id")
    p.add_argument("--model", default="mock-llm", help="model name served (default mock-llm)")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token, ms")
    p.add_argument("--itl-ms", type=float, default=0.0, help="time between tokens, ms")
    p.add_argument("--tokens", type=int, default=16,
                   help="tokens per answer when the request has no max_tokens (default 16)")
    p.add_argument("--fail-rate", type=float, default=0.0,
                   help="share of generation requests answered 500 (0-1)")
    p.add_argument("--hang-rate", type=float, default=0.0,
                   help="share of generation requests never answered (0-1)")
    p.add_argument("--reset-rate", type=float, default=0.0,
                   help="share of streams whose connection is reset mid-stream (0-1)")
    p.add_argument("--reset-after", type=int, default=4,
                   help="tokens sent before an injected reset (default 4)")
    args = p.parse_args(argv)
    for name in ("fail_rate", "hang_rate", "reset_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if not 0 <= args.port <= 65535:
        p.error("--port must be between 0 and 65535")
    return args


def knobs_from(args: argparse.Namespace) -> Knobs:
    return Knobs(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens,
                 fail_rate=args.fail_rate, hang_rate=args.hang_rate,
                 reset_rate=args.reset_rate, reset_after=args.reset_after, model=args.model)


def main(argv: Optional[List[str]] = None) -> None:
    from twisted.internet import reactor

    args = parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site = make_site(args.id, knobs_from(args), reactor)
    # A real server's backlog (uvicorn's is 2048): Twisted's default of 50
    # would drop SYNs when a gateway opens hundreds of connections at once.
    ep = endpoints.TCP4ServerEndpoint(reactor, args.port, backlog=1024, interface=args.bind)

    def listening(port):
        # The one line a supervising script waits for.
        sys.stdout.write(f"ntonix-mock {args.id} listening on {args.bind}:{port.getHost().port}\n")
        sys.stdout.flush()

    def failed(f):
        sys.stderr.write(f"ntonix-mock: cannot listen on {args.bind}:{args.port}: "
                         f"{f.getErrorMessage()}\n")
        reactor.stop()

    ep.listen(site).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()

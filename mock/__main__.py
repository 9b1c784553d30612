"""Run the mock LLM backend on its own: ``python -m ntonix_mock --port 8001 --id a``.

With ``--inference`` it serves the vLLM-like simulator instead
(:mod:`ntonix_mock.simulator`: queueing, prefill lane, prefix cache, LoRA slots).
"""

import argparse
import sys
from typing import Any, Dict, List, Optional

from twisted.internet import endpoints
from twisted.logger import globalLogBeginner, textFileLogObserver

from ntonix_mock.server import Knobs, make_site
from ntonix_mock.simulator import SimParams, make_sim_site


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ntonix-mock", description=__doc__)
    p.add_argument("--port", type=int, default=8001, help="listening port (default 8001)")
    p.add_argument("--bind", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--id", default="mock", help="backend id, sent as X-Backend-Id")
    # None until parsed: the default depends on the mode.
    p.add_argument("--model", default=None,
                   help="model name served (default mock-llm, sim-llm with --inference)")
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
    sim = p.add_argument_group("inference mode (--inference)")
    sim.add_argument("--inference", action="store_true",
                     help="serve the vLLM-like simulator instead of the plain mock")
    sim.add_argument("--kv-blocks", type=int, help="prefix cache capacity, blocks (default 2048)")
    sim.add_argument("--block-tokens", type=int, help="tokens per cache block (default 16)")
    sim.add_argument("--bytes-per-token", type=int,
                     help="prompt bytes per token (default 4)")
    sim.add_argument("--max-running", type=int,
                     help="most requests running at once, vLLM's max_num_seqs (default 16)")
    sim.add_argument("--prefill-ms-base", type=float,
                     help="fixed cost of a prefill, ms (default 2)")
    sim.add_argument("--prefill-ms-per-token", type=float,
                     help="prefill cost per uncached prompt token, ms (default 0.05)")
    sim.add_argument("--decode-ms-base", type=float,
                     help="fixed time between tokens, ms (default 5)")
    sim.add_argument("--decode-ms-per-running", type=float,
                     help="time between tokens added per running request, ms (default 0.25)")
    sim.add_argument("--output-tokens", type=int,
                     help="tokens per answer when the request has no max_tokens (default 32)")
    sim.add_argument("--lora", action="append", metavar="NAME",
                     help="a LoRA adapter served (repeatable)")
    sim.add_argument("--max-loras", type=int, help="adapters loaded at once (default 2)")
    sim.add_argument("--lora-load-ms", type=float, help="time to load an adapter, ms (default 150)")
    sim.add_argument("--loading", action="store_true",
                     help="start loading: 503 until POST /control {\"loading\": false}")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "sim-llm" if args.inference else "mock-llm"
    if args.inference:
        problems = SimParams().update(sim_changes(args))
        if problems:
            p.error("; ".join(problems))
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


# SimParams field -> command-line dest, for the flags given.
_SIM_FLAGS = ("kv_blocks", "block_tokens", "bytes_per_token", "max_running", "prefill_ms_base",
              "prefill_ms_per_token", "decode_ms_base", "decode_ms_per_running",
              "output_tokens", "max_loras", "lora_load_ms")


def sim_changes(args: argparse.Namespace) -> Dict[str, Any]:
    """The SimParams the command line sets (flags not given keep their defaults)."""
    changes: Dict[str, Any] = {"model": args.model}
    for name in _SIM_FLAGS:
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.lora:
        changes["loras"] = list(args.lora)
    if args.loading:
        changes["loading"] = True
    return changes


def sim_params_from(args: argparse.Namespace) -> SimParams:
    params = SimParams()
    problems = params.update(sim_changes(args))
    if problems:
        raise ValueError("; ".join(problems))
    return params


def main(argv: Optional[List[str]] = None) -> None:
    from twisted.internet import reactor

    args = parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    if args.inference:
        site = make_sim_site(args.id, sim_params_from(args), reactor)
    else:
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

"""Container health check: ``python -m ntonix.healthcheck --port 8080``.

Exits 0 when ``GET /health`` answers 200 within the timeout, 1 otherwise.
(Slim images have no curl; this needs only the standard library.)
"""

import argparse
import sys
import urllib.error
import urllib.request
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ntonix-healthcheck", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--path", default="/health")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    url = f"http://{args.host}:{args.port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError, ValueError) as e:
        sys.stderr.write(f"unhealthy: {url}: {e}\n")
        return 1
    if not ok:
        sys.stderr.write(f"unhealthy: {url}: HTTP {r.status}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

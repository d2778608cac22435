"""`python -m dataplane.healthcheck --file PATH`: exit 0 while the data plane's heartbeat is fresh.

Used by compose's health check; it reads a file and must not import torch or touch the socket.
"""

from __future__ import annotations

import argparse
import sys

from dataplane.health import check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dataplane.healthcheck", description=__doc__)
    p.add_argument("--file", required=True, help="the data plane's --health-file")
    p.add_argument("--max-age", type=float, default=60.0, help="seconds a heartbeat stays valid")
    args = p.parse_args(argv)
    ok, why = check(args.file, args.max_age)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

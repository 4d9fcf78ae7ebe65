"""`python -m AnomalyFlagWeb --input SCORED_FOLDER [--port 8080] [--reviewer NAME] [--host HOST]`."""

import argparse
import logging
import sys

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
NO_AUTH_WARNING = (
    "WARNING: the review server has no authentication: anyone who can reach {host}:{port} can read the scans "
    "and record decisions. Put it behind the hospital's authenticating proxy."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomalyflag review-server",
                                description="Review flagged slices in the browser (a trame-slicer app).")  # fmt: skip
    p.add_argument("--input", required=True, help="folder of scored cases (with worklist.csv or <case>_summary.json)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; 0: any free port)")
    p.add_argument("--reviewer", default="", help="reviewer's name (else asked for in the page)")
    p.add_argument("--host", default="localhost", help="address to bind (default localhost: this machine only)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.host not in LOCAL_HOSTS:
        print(NO_AUTH_WARNING.format(host=args.host, port=args.port), file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("trame_server").setLevel(logging.WARNING)
    from .reviewApp import startServer

    # trame reads sys.argv too: give it only what it understands
    sys.argv = [sys.argv[0]]
    startServer(args.input, reviewer=args.reviewer, port=args.port, host=args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())

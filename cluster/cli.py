"""The ``probe`` command line.

Exit code 0 on success; on failure a one-line reason on stderr and a non-zero code
(2 for bad input, 1 for anything else).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description="Loss-landscape geometry of trained networks.")
    sub = parser.add_subparsers(dest="verb", required=True)
    demo = sub.add_parser("demo", help="run the embedded default job on the digits data")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "demo":
            from cluster.demo import run_demo

            run_demo(args.out, seed=args.seed)
        return 0
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"probe {args.verb}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is a one-line reason
        print(f"probe {args.verb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

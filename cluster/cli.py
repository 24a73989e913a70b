"""The ``probe`` command line.

Verbs: ``run SPEC``, ``submit SPEC --address URL``, ``audit SPEC --every DURATION | --once``,
``report RESULTS_DIR``, ``demo``. Every verb exits 0
on success; on failure it prints a one-line reason on stderr and exits non-zero
(2 for bad input: spec, checkpoint, data; 3 when the cluster cannot place the
workers, cannot be reached, or the job would not fit this host's memory; 1 for
anything else).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]

EXIT_BAD_INPUT, EXIT_CLUSTER, EXIT_OTHER = 2, 3, 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description="Loss-landscape geometry of trained networks.")
    sub = parser.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="run a job spec (local Ray instance, or cluster.address)")
    run.add_argument("spec", help="job spec (YAML)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec value, e.g. --set cluster.num_workers=2 (repeatable)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://ADDR:PORT/metrics while the job runs",
    )
    run.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default: loopback)")

    submit = sub.add_parser("submit", help="submit a job spec to a Ray cluster as a Ray job")
    submit.add_argument("spec", help="job spec (YAML)")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted instead of streaming logs")
    submit.add_argument(
        "--working-dir", default=".", help="folder uploaded as the job's working directory (default: .)"
    )
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job (default 3600)")

    audit = sub.add_parser("audit", help="audit a checkpoint folder: once, or every DURATION")
    audit.add_argument("spec", help="job spec (YAML); its model.checkpoints name the folders, globs or index to watch")
    when = audit.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", metavar="DURATION", help="run a pass every DURATION (e.g. 30m, 1h, 90s) until stopped")
    when.add_argument("--once", action="store_true", help="run one pass and exit")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    audit.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (default with --every: 9464; off with --once)",
    )
    audit.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address for the metrics endpoint (default: loopback)"
    )
    audit.add_argument(
        "--max-passes", type=int, default=None, help="stop after this many passes (default: run until stopped)"
    )

    report = sub.add_parser("report", help="render a results folder into PNG figures and one self-contained HTML page")
    report.add_argument("results", metavar="RESULTS_DIR", help="a job's output.path")
    report.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")

    demo = sub.add_parser("demo", help="run the embedded default job on the digits data")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--workers", type=int, default=2, help="Ray workers in the local instance (default: 2)")
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="loopback port for the metrics endpoint while the demo runs (default 9464; a free one if taken)",
    )
    return parser


def _run(args) -> int:
    from cluster.job import choose_backend, run_job
    from cluster.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    backend = choose_backend(spec)
    if backend == "ray":
        from cluster.job import preflight
        from cluster.raytools import connect

        preflight(spec)  # checkpoints, model and data checked: bad input exits 2 before Ray starts
        connect(spec.cluster.address, num_cpus=None)
    metrics = server = None
    if args.metrics_port is not None:
        from cluster.metrics import Metrics, serve

        metrics = Metrics()
        server, _ = serve(metrics, port=args.metrics_port, addr=args.metrics_addr)
        print(f"metrics at http://{args.metrics_addr}:{server.server_port}/metrics", file=sys.stderr)
    try:
        summary = run_job(spec, backend=backend, metrics=metrics)
    finally:
        if server is not None:
            server.shutdown()
    if not summary.ok:
        first = summary.failures[0]
        print(
            f"probe run: {summary.num_failed} of {summary.num_tasks} task(s) failed; first: {first['kind']} @ "
            f"{first['checkpoint']}: {str(first['reason']).splitlines()[0]}",
            file=sys.stderr,
        )
        return EXIT_OTHER
    return 0


def _submit(args) -> int:
    from cluster.raytools import submit_job
    from cluster.spec import load_spec

    load_spec(args.spec, args.overrides)  # validate before anything leaves this machine
    return submit_job(
        args.address,
        args.spec,
        args.overrides,
        working_dir=args.working_dir,
        wait=not args.no_wait,
        timeout_s=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """The ``probe`` command: parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    args = _parser().parse_args(argv)
    from cluster.errors import ProbeError

    try:
        if args.verb == "run":
            return _run(args)
        if args.verb == "submit":
            return _submit(args)
        if args.verb == "audit":
            from cluster.audit import audit_main

            return audit_main(args)
        if args.verb == "report":
            from cluster.report import write_report

            html = write_report(args.results, args.out)
            print(f"report: {html}")
            return 0
        if args.verb == "demo":
            from cluster.demo import run_demo

            run_demo(args.out, seed=args.seed, num_workers=args.workers, metrics_port=args.metrics_port)
        return 0
    except ProbeError as exc:  # the exit code is the error type's (cluster/errors.py)
        print(f"probe {args.verb}: {exc}", file=sys.stderr)
        return exc.exit_code
    except FileNotFoundError as exc:
        print(f"probe {args.verb}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConnectionError as exc:
        print(f"probe {args.verb}: {exc}", file=sys.stderr)
        return EXIT_CLUSTER
    except KeyboardInterrupt:
        print(f"probe {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is a one-line reason
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"probe {args.verb}: {type(exc).__name__}: {first}", file=sys.stderr)
        if os.environ.get("PROBE_DEBUG"):
            raise
        return EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())

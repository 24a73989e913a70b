"""The ``probe`` command line.

Verbs: ``run SPEC``, ``submit SPEC --address URL``, ``audit SPEC --every DURATION | --once``,
``report RESULTS_DIR``, ``export RESULTS_DIR --to tensorboard|mlflow|wandb``, ``demo``,
``validate SPEC`` (plan and estimate, nothing run), ``schema`` (the JSON Schema of specs);
``probe --version``. Every verb exits 0
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
    parser.add_argument("--version", action="version", version=_version())
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
    _submit_options(submit)

    validate = sub.add_parser(
        "validate", help="print the resolved spec, the task plan and the memory estimate; run nothing"
    )
    validate.add_argument("spec", help="job spec (YAML)")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    sub.add_parser("schema", help="print the JSON Schema (draft 2020-12) of job specs")

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
    audit.add_argument(
        "--pushgateway",
        metavar="URL",
        default=None,
        help="with --once: push the pass's metrics to this Prometheus Pushgateway, e.g. http://pushgateway:9091 "
        "(default: $PROMETHEUS_PUSHGATEWAY; off when unset)",
    )

    report = sub.add_parser("report", help="render a results folder into PNG figures and one self-contained HTML page")
    report.add_argument("results", metavar="RESULTS_DIR", help="a job's output.path")
    report.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")

    export = sub.add_parser(
        "export", help="log every scalar of a results folder to TensorBoard, MLflow or W&B at its training step"
    )
    export.add_argument("results", metavar="RESULTS", help="a job's output.path")
    export.add_argument("--to", required=True, choices=("tensorboard", "mlflow", "wandb"), help="the tracker")
    export.add_argument(
        "--out",
        default=None,
        help="TensorBoard log folder (default RESULTS/tensorboard); MLflow tracking URI or file-store folder "
        "(default $MLFLOW_TRACKING_URI, else RESULTS/mlruns); W&B run-files folder (default RESULTS/wandb)",
    )
    export.add_argument("--run-name", default=None, help="run name (default: the job's; NAME-<job> for several jobs)")

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
    for verb in (run, audit):  # live progress: log format and stall time (cluster.progress, cluster.logs)
        verb.add_argument(
            "--log-format",
            choices=("text", "json"),
            default="text",
            help="text lines on stdout (default), or one JSON object per record on stderr (for pods' log collectors)",
        )
        verb.add_argument(
            "--stall-after",
            type=_seconds,
            default=None,
            metavar="SECONDS",
            help="report a task without progress for this long as stalled (metric and warning; default 900)",
        )
    return parser


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, e.g. 900, got {text!r}")
    return value


def _live_progress(args) -> None:
    """Log records as ``--log-format`` says, the stall time, and a progress bar when stderr is a terminal."""
    from cluster.logs import configure
    from cluster.progress import set_defaults

    configure(args.log_format)
    changes: dict = {"bar": args.log_format == "text" and sys.stderr.isatty()}
    if args.stall_after is not None:
        changes["stall_after_s"] = args.stall_after
    set_defaults(**changes)


def _version() -> str:
    """``probe --version``: the installed distribution's version and torch's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("landscape-probe")
    except PackageNotFoundError:
        mine = "unknown (not installed)"
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"landscape-probe {mine} (torch {torch_version}, Python {sys.version.split()[0]})"


def _submit_options(submit: argparse.ArgumentParser) -> None:
    """``probe submit``'s runtime environment, entrypoint resources and entrypoint verb
    (``ray.job_submission.JobSubmissionClient.submit_job``)."""
    submit.add_argument(
        "--runtime-env",
        metavar="JSON|FILE",
        default=None,
        help="Ray runtime environment merged into the job's (JSON text, or a .json/.yaml file), "
        'e.g. \'{"pip": ["my-models"], "env_vars": {"HF_HOME": "/data/hf"}}\'; --working-dir sets working_dir',
    )
    submit.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    submit.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    submit.add_argument(
        "--entrypoint-memory", type=int, default=None, metavar="BYTES", help="memory reserved for the driver (bytes)"
    )
    submit.add_argument(
        "--verb",
        dest="verb_name",
        choices=("run", "audit"),
        default="run",
        help="what the job runs: `probe run SPEC` (default) or `probe audit SPEC` with --verb-args",
    )
    submit.add_argument(
        "--verb-args",
        default="",
        metavar="ARGS",
        help="more arguments of the job's verb: --verb-args=--once, or --verb-args '--every 30m --metrics-port 9464'",
    )
    submit.add_argument(
        "--stop-on-signal",
        action="store_true",
        help="on SIGTERM/SIGINT ask Ray to stop the job (its driver gets SIGTERM) and follow it until it ends",
    )


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
    from cluster.logs import log_line

    try:
        summary = run_job(spec, backend=backend, metrics=metrics, progress=log_line)
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

    spec = load_spec(args.spec, args.overrides)  # validate before anything leaves this machine
    return submit_job(
        args.address,
        args.spec,
        args.overrides,
        working_dir=args.working_dir,
        wait=not args.no_wait,
        timeout_s=args.timeout,
        runtime_env=args.runtime_env,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        entrypoint_memory=args.entrypoint_memory,
        verb=args.verb_name,
        verb_args=args.verb_args,
        checkpoints=spec.model.checkpoints,
        stop_on_signal=args.stop_on_signal,
    )


def main(argv: list[str] | None = None) -> int:
    """The ``probe`` command: parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    args = _parser().parse_args(argv)
    from cluster.errors import ProbeError

    try:
        if args.verb in ("run", "audit"):
            _live_progress(args)
        if args.verb == "run":
            return _run(args)
        if args.verb == "submit":
            return _submit(args)
        if args.verb == "validate":
            from cluster.validate import validate_spec

            return validate_spec(args.spec, args.overrides)
        if args.verb == "schema":
            import json

            from cluster.spec_schema import spec_schema

            print(json.dumps(spec_schema(), indent=2, ensure_ascii=False))
            return 0
        if args.verb == "audit":
            from cluster.audit import audit_main

            return audit_main(args)
        if args.verb == "report":
            from cluster.report import write_report

            html = write_report(args.results, args.out)
            print(f"report: {html}")
            return 0
        if args.verb == "export":
            from cluster.export import export_results

            export_results(args.results, args.to, out=args.out, run_name=args.run_name)
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
    finally:
        if args.verb in ("run", "audit"):
            from cluster.logs import reset
            from cluster.progress import set_defaults

            reset()  # the handlers and defaults were this call's: a caller in the same process keeps its own
            set_defaults(reset=True)


if __name__ == "__main__":
    sys.exit(main())

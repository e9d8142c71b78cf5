"""Command line: ``main(argv) -> int``, the only place that prints errors and sets exit codes.

    streammerge [merge] --base DIR --adapter DIR[:WEIGHT] [...]   merge (the default command)
    streammerge --base DIR --batch JOBS.json --ray auto           the same on a Ray cluster
    streammerge plan --base DIR --adapter DIR [...]               dry run from headers only
    streammerge verify OUT                                        check a merged output
    streammerge demo [DIR]                                        build a tiny model + adapter, merge, check
    streammerge ui [--host H] [--port P] [--token T]              the web page (optional extra 'ui')

Imports no torch until a merge actually starts, so ``--help`` is instant. With ``--json`` the
result is one JSON object on stdout: ``{"exit_code": 0, "outputs": [report, ...]}`` for a merge
(one output or several), the plan or the verify result (with ``exit_code``) for those, and
``{"error": "...", "exit_code": N}`` for any failure (the line on stderr is printed as well).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import ExitCode, Interrupted, StreamMergeError, UsageError
from .args import PARSERS, SUBCOMMANDS, executor, input_options, jobs, merge_parser
from .printing import OutputLine, PlanLine, print_json, print_plan, print_reports, print_verify

__all__ = ["main", "console_main"]


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("streammerge: %(levelname)s: %(message)s"))
    root = logging.getLogger("streammerge")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    report = run_demo(args.dir, max_mem=args.max_mem)
    if args.json:
        print_json({"exit_code": 0, "outputs": [report]})
        return ExitCode.OK
    print_reports([report])
    print(f"demo check passed: every merged element within one rounding of the float64 result (plus the "
          f"float32 accumulation bound), untouched tensors bit-identical ({args.dir})")
    return ExitCode.OK


def _verify(args: argparse.Namespace) -> int:
    from ..verify import verify, verify_recorded

    out = args.out or args.output
    if out is None:
        raise UsageError("verify: name the merged directory: streammerge verify OUT")
    if (args.base is None) != (args.adapter is None):
        raise UsageError("verify: give both --base and --adapter, or neither (then they are read from OUT's manifest)")
    if out.suffix == ".gguf":
        from ..verify_gguf import verify_gguf

        if args.base is None:
            raise UsageError(f"verify: {out} is a GGUF file, which records no inputs: give --base and --adapter")
        result = verify_gguf(args.base, args.adapter, out, rows_per_tensor=args.rows).to_dict()
    else:
        result = (verify(args.base, args.adapter, out, rows_per_tensor=args.rows) if args.base else
                  verify_recorded(out, rows_per_tensor=args.rows)).to_dict()
    code = ExitCode.OK if result["ok"] else ExitCode.VERIFY
    if args.json:
        print_json({**result, "exit_code": int(code)})
    else:
        print_verify(result, quiet=args.quiet)
    return code


def _plan(args: argparse.Namespace) -> int:
    from ..inputs import open_inputs
    from ..options import MergeOptions
    from ..plan.summary import summary
    from ..run.workingset import WorkingSet
    from ..sources.hub import is_repo_id, progress_bars

    if is_repo_id(args.base) or any(is_repo_id(str(a.path)) for a in args.adapter):
        progress_bars(not args.quiet)
    opts = MergeOptions.build(**input_options(args), max_mem=args.max_mem, overwrite=args.overwrite)
    inputs = open_inputs(args.base, opts)
    gguf = None
    if args.output is not None and args.output.suffix == ".gguf":
        from ..api import plan_gguf

        plan, warnings, gguf = plan_gguf(inputs, args.adapter, args.output, opts)
    else:
        plan, warnings = inputs.plan(args.adapter, opts)
    held = gguf["held_bytes"] if gguf else 0  # (a GGUF sink's header and conversion pieces)
    doc = {**summary(plan), "memory": WorkingSet.of(plan, args.max_mem, held=held).to_dict(), "warnings": warnings}
    if gguf is not None:
        doc["gguf"] = gguf
    elif args.output is not None:
        from ..output.space import check_output_space

        doc["output"] = check_output_space(args.output, plan, overwrite=args.overwrite)
    if args.json:
        print_json({**doc, "exit_code": 0})
    else:
        print_plan(doc, verbose=args.verbose)
    return ExitCode.OK


def _merge(args: argparse.Namespace) -> int:
    from ..api import merge_many
    from ..events import JsonLines, Listener

    listener: Listener | None = JsonLines() if args.progress == "json" else None if args.quiet else OutputLine()
    reports = merge_many(args.base, jobs(args), on_event=listener, executor=executor(args),
                         device=args.device, max_mem=args.max_mem, overwrite=args.overwrite,
                         progress=args.progress == "auto" and not args.quiet, checksum=args.checksum,
                         allow_noop=args.allow_noop, low_disk=args.low_disk, push_to_hub=args.push_to_hub,
                         private=args.private, hub_revision=args.revision, **input_options(args))
    if args.json:
        print_json({"exit_code": 0, "outputs": [r.to_dict() for r in reports]})
    else:
        print_reports([r.to_dict() for r in reports])
    return ExitCode.OK


def _ui(args: argparse.Namespace) -> int:
    from ..ui import serve

    return serve(host=args.host, port=args.port, token=args.token, jobs_dir=args.jobs_dir)


COMMANDS = {"merge": _merge, "plan": _plan, "verify": _verify, "demo": _demo, "ui": _ui}


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(message, file=sys.stderr)
    if getattr(args, "json", False):
        print_json({"error": message.removeprefix("streammerge: error: "), "exit_code": int(code)})
    return code


def _run(argv: list[str]) -> int:
    named = bool(argv) and argv[0] in SUBCOMMANDS
    command = argv[0] if named else "merge"
    parser = merge_parser("streammerge merge") if named and command == "merge" else PARSERS[command]()
    args = parser.parse_args(argv[1:] if named else argv)
    _setup_logging(args)
    try:
        return COMMANDS[command](args)
    except StreamMergeError as exc:
        if args.traceback:
            traceback.print_exc()
        return _fail(args, f"streammerge: error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "streammerge: interrupted; finished shards are kept: rerun the same command to resume",
                     ExitCode.INTERRUPTED)
    except Exception as exc:  # the error boundary: a bug, shown briefly unless asked
        if args.traceback:
            traceback.print_exc()
        return _fail(args, f"streammerge: internal error: {type(exc).__name__}: {exc} (rerun with --traceback and "
                     "report it)", ExitCode.ERROR)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("terminated by SIGTERM; finished shards are kept: rerun the same command to resume",
                      exit_code=ExitCode.TERMINATED)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (tests call this in-process)."""
    return _run(list(sys.argv[1:] if argv is None else argv))


def console_main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())


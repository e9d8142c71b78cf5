"""Command line: ``main(argv) -> int``, the only place that prints errors and sets exit codes.

    streammerge --base DIR --adapter DIR[:WEIGHT] [...]     merge (the default command)
    streammerge plan --base DIR --adapter DIR [...]          dry run from headers only
    streammerge demo [DIR]                                   build a tiny model + adapter, merge, check

Imports no torch until a merge actually starts, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ExitCode, Interrupted, StreamMergeError, UsageError
from .memory import DEFAULT_MAX_MEM, format_size, parse_size

SUBCOMMANDS = ("plan", "verify", "demo")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _adapter_spec(text: str) -> Any:
    """``DIR`` or ``DIR:WEIGHT`` (the weight is a float after the last colon)."""
    from .inputs import AdapterSpec

    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).exists():
        try:
            return AdapterSpec(Path(head), float(tail))
        except ValueError:
            pass
    return AdapterSpec(Path(text))


def _common(p: argparse.ArgumentParser, *, adapter_required: bool = True) -> None:
    p.add_argument("--base", required=True, help="base checkpoint directory (safetensors, sharded or single file)")
    p.add_argument("--adapter", required=adapter_required, action="append", type=_adapter_spec, metavar="DIR[:WEIGHT]",
                   help="PEFT LoRA adapter directory; repeat to merge a weighted sum of adapters")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="output dtype of floating tensors (auto: keep each tensor's dtype)")
    p.add_argument("--map", action="append", default=[], metavar="REGEX=REPLACEMENT",
                   help="extra module-name rule, tried before the built-in table (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress bar, errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log each step")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streammerge",
        description="Merge LoRA adapters into a safetensors checkpoint shard by shard, in bounded memory. "
        "Other commands: 'streammerge plan ...' (dry run), 'streammerge verify ...' (check an output), "
        "'streammerge demo' (built-in example).",
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    _common(p, adapter_required=False)
    p.add_argument("--output", type=Path, action="append",
                   help="output directory (default: BASE-merged beside the base). Give one --output per --adapter "
                   "to write that many merged checkpoints in one pass over the base")
    p.add_argument("--batch", type=Path, metavar="FILE",
                   help='instead of --adapter/--output: a JSON list of {"output": DIR, "adapters": [DIR[:WEIGHT], ...]}, '
                   "one merged checkpoint each, all in one pass over the base")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present; default)")
    p.add_argument("--max-mem", type=_size, default=DEFAULT_MAX_MEM, metavar="SIZE",
                   help="working-memory cap (host RAM on CPU, GPU memory on CUDA), e.g. 512MB, 20GB, 20GiB "
                   f"(default {format_size(DEFAULT_MAX_MEM)})")
    p.add_argument("--overwrite", action="store_true", help="replace the merged checkpoint in a non-empty --output")
    p.add_argument("--allow-noop", action="store_true",
                   help="write the output even when the adapter changes nothing (all lora_B zero, or weight 0)")
    p.add_argument("--no-checksum", dest="checksum", action="store_false",
                   help="skip the sha256 of each output shard in the manifest (saves one read of the output)")
    hub = p.add_argument_group("Hugging Face Hub (--base/--adapter may also be ORG/NAME[@REVISION])")
    hub.add_argument("--low-disk", action="store_true",
                     help="fetch each base shard into a private folder and delete it once merged (disk: the output "
                     "plus about two shards; the Hub cache is not touched)")
    hub.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the merged checkpoint as one commit, with a "
                     "model card (with --low-disk, local shards are deleted once uploaded)")
    hub.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    hub.add_argument("--revision", metavar="BRANCH", help="branch to commit to with --push-to-hub (default main)")
    return p


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge plan", description="Dry run: map adapter modules to base "
                                "tensors from the headers alone and print the plan. Writes nothing.")
    _common(p)
    p.add_argument("--max-mem", type=_size, default=DEFAULT_MAX_MEM, metavar="SIZE",
                   help="the budget to size the working set for (as for a merge)")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge verify", description="Re-read a merged output and check it "
                                "against its base and adapters: layout, checksums, untouched bytes, and a sample "
                                "of rows of every merged tensor recomputed in float64. Exit 0: verified; 7: differences.")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True, action="append", type=_adapter_spec, metavar="DIR[:WEIGHT]")
    p.add_argument("--output", required=True, type=Path, help="the merged directory to check")
    p.add_argument("--rows", type=int, default=8, help="rows sampled per merged tensor (default 8)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--traceback", action="store_true")
    return p


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge demo", description="Build a tiny Llama-shaped checkpoint and a "
                                "LoRA adapter, merge them, and check the result against float64 arithmetic.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("streammerge-demo"),
                   help="working directory (default ./streammerge-demo; replaced if it holds an earlier demo)")
    p.add_argument("--max-mem", type=_size, default=parse_size("64MB"), metavar="SIZE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--traceback", action="store_true")
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("streammerge: %(levelname)s: %(message)s"))
    root = logging.getLogger("streammerge")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"merged {report['tensors_merged']} tensors ({report['adapter_modules']} adapter modules), "
        f"replaced {report['tensors_replaced']}, converted {report['tensors_converted']}, "
        f"copied {report['tensors_copied']} unchanged "
        f"-> {report['output']}"
    )
    gpu = f", GPU peak {format_size(report['peak_gpu'])}" if report.get("peak_gpu") is not None else ""
    print(
        f"{report['shards']} shard(s), {format_size(report['bytes_written'])} in {report['seconds']:.1f} s on "
        f"{report['device']}; peak RSS {format_size(report['peak_rss'])} (baseline "
        f"{format_size(report['baseline_rss'])}, budget {format_size(report['max_mem'])}){gpu}"
    )
    if report.get("base_commit"):
        print(f"base read from the Hub at commit {report['base_commit']}: {report['shards_downloaded']} shard(s) "
              "downloaded by this run")
    if report.get("pushed_to"):
        print(f"pushed: {report['pushed_to']}")
    for note in report["notes"]:
        print(f"note: {note}")


def _print_plan(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for m in summary["modules"]:
        print(f"{m['adapter']}: {m['module']} -> {m['tensor']}  [{m['kind']}, r={m['r']} scale={m['scale']:g}; "
              f"{m['rule']}]")
    for tensor, source in summary["replaced"].items():
        print(f"replaced: {tensor} <- {source}")
    for tensor, ids in summary["token_rows"].items():
        print(f"token rows: {tensor} rows {ids}")
    for tensor in summary["added"]:
        print(f"added: {tensor}")
    for key, value in summary["config_changes"].items():
        print(f"config.json: {key} = {json.dumps(value)}")
    if summary["tokenizer_from"]:
        print(f"tokenizer from: {summary['tokenizer_from']}")
    memory = summary["memory"]
    print(f"{summary['tensors_merged']} of {summary['tensors_total']} output tensors change; "
          f"output {format_size(summary['output_bytes'])}, dtype {summary['out_dtype']}; working set "
          f"{format_size(memory['working_set_bytes'])} of --max-mem {format_size(memory['max_mem'])} "
          f"(chunks of {memory['chunk_elements']} elements)")


def _print_verify(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for problem in result["problems"]:
        print(f"DIFFERS: {problem}")
    verdict = "verified" if result["ok"] else "NOT verified"
    print(f"{verdict}: {result['output']}: {result['tensors_compared']} untouched tensors compared byte for byte, "
          f"{result['tensors_sampled']} merged tensors sampled ({result['rows_sampled']} rows, worst "
          f"{result['max_error_ratio']:.2f} of the one-rounding bound), {result['shards_hashed']} shard checksums")


def _batch(path: Path) -> list[tuple[list[Any], Path | None]]:
    """--batch FILE: [{"output": DIR, "adapters": [DIR[:WEIGHT], ...]}, ...]; paths as on the command line."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--batch {path}: cannot read it as JSON ({exc})") from None
    ok = isinstance(doc, list) and doc and all(
        isinstance(job, dict) and isinstance(job.get("output"), str) and isinstance(job.get("adapters"), list)
        and job["adapters"] and all(isinstance(a, str) for a in job["adapters"]) for job in doc)
    if not ok:
        raise UsageError(f'--batch {path}: expected a non-empty JSON list of {{"output": "DIR", "adapters": '
                         '["DIR[:WEIGHT]", ...]}} objects')
    return [([_adapter_spec(a) for a in job["adapters"]], Path(job["output"])) for job in doc]


def _jobs(args: argparse.Namespace) -> list[tuple[list[Any], Path | None]]:
    """One --output (or none): one checkpoint from all the adapters (a weighted sum). One --output per
    --adapter: that many checkpoints, in one pass over the base. --batch FILE: the same, from a file."""
    for flag, given in (("--private", args.private), ("--revision", args.revision)):
        if given and not args.push_to_hub:
            raise UsageError(f"{flag} only applies with --push-to-hub ORG/NAME")
    if args.batch is not None:
        if args.adapter or args.output:
            raise UsageError("--batch FILE replaces --adapter and --output; give one or the other")
        return _batch(args.batch)
    if not args.adapter:
        raise UsageError("no adapter given: pass --adapter DIR (or --batch FILE)")
    outputs = args.output or [None]
    if len(outputs) == 1:
        return [(args.adapter, outputs[0])]
    if len(outputs) == len(args.adapter):
        return [([a], o) for a, o in zip(args.adapter, outputs)]
    raise UsageError(f"{len(outputs)} --output for {len(args.adapter)} --adapter: give one --output per --adapter "
                     "(one merged checkpoint each, one pass over the base), or a single --output for their weighted sum")


def _run(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
    else:
        command = "merge"
    parser = {"merge": _parser, "plan": _plan_parser, "verify": _verify_parser, "demo": _demo_parser}[command]()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        if command == "demo":
            from .demo import run_demo

            report = run_demo(args.dir, max_mem=args.max_mem)
            _print_report(report, args.json)
            print(f"demo check passed: every merged element within one rounding of the float64 result (plus the "
                  f"float32 accumulation bound), untouched tensors bit-identical ({args.dir})")
            return ExitCode.OK
        from .api import merge_many
        from .inputs import open_inputs

        if command == "verify":
            from .verify import verify

            result = verify(args.base, args.adapter, args.output, rows_per_tensor=args.rows).to_dict()
            _print_verify(result, args.json)
            return ExitCode.OK if result["ok"] else ExitCode.VERIFY
        if command == "plan":
            from .options import MergeOptions
            from .run.workingset import WorkingSet
            from .sources.hub import is_repo_id, progress_bars

            if is_repo_id(args.base) or any(is_repo_id(str(a.path)) for a in args.adapter):
                progress_bars(not args.quiet)
            opts = MergeOptions.build(dtype=args.dtype, maps=args.map)
            plan = open_inputs(args.base, opts).plan(args.adapter, opts)[0]
            _print_plan({**plan.summary(), "memory": WorkingSet.of(plan, args.max_mem).to_dict()}, args.json)
            return ExitCode.OK
        reports = merge_many(args.base, _jobs(args), device=args.device, max_mem=args.max_mem,
                             dtype=args.dtype, overwrite=args.overwrite, maps=args.map, progress=not args.quiet,
                             checksum=args.checksum, allow_noop=args.allow_noop, low_disk=args.low_disk,
                             push_to_hub=args.push_to_hub, private=args.private, hub_revision=args.revision)
        if args.json and len(reports) > 1:
            print(json.dumps([r.to_dict() for r in reports], indent=2))
        for report in reports if not (args.json and len(reports) > 1) else []:
            _print_report(report.to_dict(), args.json)
        return ExitCode.OK
    except StreamMergeError as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"streammerge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("streammerge: interrupted; finished shards are kept: rerun the same command to resume",
              file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # the error boundary: a bug, shown briefly unless asked
        if args.traceback:
            traceback.print_exc()
        print(f"streammerge: internal error: {type(exc).__name__}: {exc} (rerun with --traceback and report it)",
              file=sys.stderr)
        return ExitCode.ERROR


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("terminated by SIGTERM; finished shards are kept: rerun the same command to resume",
                      exit_code=ExitCode.TERMINATED)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (tests call this in-process)."""
    return _run(list(sys.argv[1:] if argv is None else argv))


def console_main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())

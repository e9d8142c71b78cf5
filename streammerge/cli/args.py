"""The command line's parsers: ``streammerge [merge] ...``, ``plan``, ``verify``, ``demo``.

Every option has help text; sizes and adapter specs are parsed here, everything else is checked
by ``MergeOptions``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import UsageError
from ..memory import DEFAULT_MAX_MEM, format_size, parse_size
from ..options import DTYPE_CHOICES
from ..sources import hub

SUBCOMMANDS = ("merge", "plan", "verify", "demo", "ui")


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def adapter_spec(text: str, relative_to: Path | None = None) -> Any:
    """``DIR`` or ``DIR:WEIGHT`` (the weight is a float after the last colon). ``relative_to``: a
    relative path is taken from there (a batch file's directory) unless only a repo id fits."""
    from ..inputs import AdapterSpec

    head, sep, tail = text.rpartition(":")
    path, weight = text, 1.0
    if sep and head and not Path(text).exists():
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    where = Path(path)
    if relative_to is not None and not where.is_absolute():
        here = relative_to / where
        where = where if not here.exists() and hub.parse(path) is not None else here
    return AdapterSpec(where, weight)


def _inputs(p: argparse.ArgumentParser, *, adapter_required: bool = True) -> None:
    p.add_argument("--base", required=True, metavar="DIR|ORG/NAME[@REV]",
                   help="base checkpoint: a directory (safetensors, sharded or single file) or a Hub repo id")
    p.add_argument("--adapter", required=adapter_required, action="append", type=adapter_spec,
                   metavar="DIR[:WEIGHT]", help="adapter directory or repo id (PEFT or mlx-lm); repeat to merge a "
                   "weighted sum of adapters")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="output dtype of floating tensors (auto: keep each tensor's dtype; a quantized base is "
                        "dequantized to its 16-bit dtype; fp8: an FP8 base written back in its own scheme, merged "
                        "weights re-quantized); for an --output ending in .gguf the GGUF file type: auto, f32, f16, "
                        "bf16, q8_0, q4_0, q4_1, q5_0, q5_1")
    p.add_argument("--map", action="append", default=[], metavar="REGEX=REPLACEMENT",
                   help="extra module-name rule, tried before the built-in table (repeatable)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="merge only adapter modules whose name or base tensor matches (repeatable); the rest is "
                   "listed in the report and the manifest")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave out adapter modules whose name or base tensor matches (repeatable); listed as excluded")
    p.add_argument("--gguf-pre", metavar="NAME", default=None,
                   help="a GGUF output's pre-tokenizer name (tokenizer.ggml.pre: llama-bpe, qwen2, ...) when its "
                        "fingerprint is not in llama.cpp's table")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="take the tokenizer files and chat template from DIR (default: the adapter's when they "
                   "differ from the base's, else the base's)")
    p.add_argument("--allow-duplicate", action="store_true",
                   help="accept the same adapter given twice (it is then added twice)")
    p.add_argument("--strict", action="store_true",
                   help="refuse an adapter whose base_model_name_or_path names another model than the base")
    _output_flags(p)


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result (or the error) as one JSON object on stdout")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress, errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log each step (plan: one line per module)")


def merge_parser(prog: str = "streammerge") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Merge adapters into a safetensors checkpoint shard by shard, in bounded memory. "
        "Other commands: 'streammerge plan ...' (dry run), 'streammerge verify OUT' (check an output), "
        "'streammerge demo' (built-in example); 'streammerge merge ...' is this command.",
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    _inputs(p, adapter_required=False)
    p.add_argument("--output", type=Path, action="append", metavar="DIR",
                   help="output directory (default: BASE-merged beside the base). Give one --output per --adapter "
                   "to write that many merged checkpoints in one pass over the base")
    p.add_argument("--batch", type=Path, metavar="FILE",
                   help='instead of --adapter/--output: a JSON list of {"output": DIR, "adapters": [DIR[:WEIGHT], ...]}, '
                   "one merged checkpoint each, all in one pass over the base (paths relative to FILE's directory)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present; default)")
    p.add_argument("--max-mem", type=size, default=DEFAULT_MAX_MEM, metavar="SIZE",
                   help="working-memory cap (host RAM on CPU, GPU memory on CUDA), e.g. 512MB, 20GB, 20GiB "
                   f"(default {format_size(DEFAULT_MAX_MEM)})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the merged checkpoint in a non-empty --output (only files an earlier streammerge "
                   "merge wrote there are removed)")
    p.add_argument("--allow-noop", action="store_true",
                   help="write the output even when the adapter changes nothing (all lora_B zero, or weight 0)")
    p.add_argument("--no-checksum", dest="checksum", action="store_false",
                   help="skip the sha256 of each output shard in the manifest (saves CPU time)")
    p.add_argument("--progress", choices=("auto", "json", "none"), default="auto",
                   help="auto: a bar on a terminal; json: every event as a JSON line on stderr; none: no bar (the "
                   "plan line stays; -q drops it)")
    group = p.add_argument_group("Hugging Face Hub (--base/--adapter may also be ORG/NAME[@REVISION])")
    group.add_argument("--low-disk", action="store_true",
                       help="fetch each base shard into a private folder and delete it once merged (disk: the "
                       "output plus about two shards; the Hub cache is not touched)")
    group.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the merged checkpoint as one commit, with a "
                       "model card (with --low-disk, local shards are deleted once uploaded)")
    group.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    group.add_argument("--revision", metavar="BRANCH", help="branch to commit to with --push-to-hub (default main)")
    group = p.add_argument_group("Ray cluster (optional extra ray; see the README's 'Running on a cluster')")
    group.add_argument("--ray", metavar="auto|local|HOST:PORT",
                       help="run on a Ray cluster: auto (the one this machine is in), local (Ray on this machine, "
                       "loopback only) or the head's HOST:PORT; paths must be shared by every node at the same path")
    group.add_argument("--ray-group", type=int, default=8, metavar="N",
                       help="outputs one worker writes in one pass over the base (default 8)")
    group.add_argument("--ray-shards", action="store_true",
                       help="spread the shards of one output over the cluster instead of outputs over workers")
    group.add_argument("--ray-summary", type=Path, metavar="FILE",
                       help="the run's summary, written last (default: FILE.summary.json beside --batch FILE, or "
                       "OUT.ray-summary.json beside a single --output OUT)")
    return p


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge plan", description="Dry run: map adapter modules to base "
                                "tensors from the headers alone and print the plan (by rule and layer range; every "
                                "module with -v or --json). Writes nothing.")
    _inputs(p)
    p.add_argument("--max-mem", type=size, default=DEFAULT_MAX_MEM, metavar="SIZE",
                   help="the budget to size the working set for (as for a merge)")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="also check this output directory as a merge would (allowed, empty, enough free space); "
                        "an output ending in .gguf: also list the GGUF file's tensors (-v: each), types and size")
    p.add_argument("--overwrite", action="store_true", help="with --output: as for a merge")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge verify", description="Re-read a merged output and check it "
                                "against its base and adapters (read from its manifest unless given): layout, "
                                "checksums, untouched bytes, non-finite values, and a sample of rows of every merged "
                                "tensor recomputed in float64. Exit 0: verified; 7: differences.")
    p.add_argument("out", nargs="?", type=Path, metavar="OUT", help="the merged directory to check")
    p.add_argument("--output", type=Path, metavar="OUT", help="the same as OUT")
    p.add_argument("--base", metavar="DIR|ORG/NAME[@REV]", help="the base (default: as recorded in OUT's manifest)")
    p.add_argument("--adapter", action="append", type=adapter_spec, metavar="DIR[:WEIGHT]",
                   help="the adapters (default: as recorded in OUT's manifest); repeatable")
    p.add_argument("--rows", type=int, default=8, help="rows sampled per merged tensor (default 8)")
    _output_flags(p)
    return p


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge demo", description="Build a tiny Llama-shaped checkpoint and a "
                                "LoRA adapter, merge them, and check the result against float64 arithmetic.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("streammerge-demo"),
                   help="working directory (default ./streammerge-demo; replaced if it holds an earlier demo)")
    p.add_argument("--max-mem", type=size, default=parse_size("64MB"), metavar="SIZE",
                   help="the merge's memory budget (default 64MB)")
    _output_flags(p)
    return p


def ui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streammerge ui", description="Serve the web page to plan, run, watch, cancel, "
                                "resume and verify merges (pip install 'streammerge[ui]'). Whoever reaches the port "
                                "can read and write what this user can.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--token", help="required on every request (bearer header, or the cookie the printed link sets)")
    p.add_argument("--jobs-dir", type=Path, default=Path.home() / ".streammerge" / "jobs",
                   help="where the job history is kept (default ~/.streammerge/jobs)")
    _output_flags(p)
    return p


PARSERS = {"merge": merge_parser, "plan": plan_parser, "verify": verify_parser, "demo": demo_parser, "ui": ui_parser}


def batch(path: Path) -> list[tuple[list[Any], Path | None]]:
    """--batch FILE: [{"output": DIR, "adapters": [DIR[:WEIGHT], ...]}, ...]; paths relative to FILE."""
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
    here = path.parent
    return [([adapter_spec(a, relative_to=here) for a in job["adapters"]], here / job["output"]) for job in doc]


def jobs(args: argparse.Namespace) -> list[tuple[list[Any], Path | None]]:
    """One --output (or none): one checkpoint from all the adapters (a weighted sum). One --output per
    --adapter: that many checkpoints, in one pass over the base. --batch FILE: the same, from a file."""
    for flag, given in (("--private", args.private), ("--revision", args.revision)):
        if given and not args.push_to_hub:
            raise UsageError(f"{flag} only applies with --push-to-hub ORG/NAME")
    if args.batch is not None:
        if args.adapter or args.output:
            raise UsageError("--batch FILE replaces --adapter and --output; give one or the other")
        return batch(args.batch)
    if not args.adapter:
        raise UsageError("no adapter given: pass --adapter DIR (or --batch FILE)")
    outputs = args.output or [None]
    if len(outputs) == 1:
        return [(args.adapter, outputs[0])]
    if len(outputs) == len(args.adapter):
        return [([a], o) for a, o in zip(args.adapter, outputs)]
    raise UsageError(f"{len(outputs)} --output for {len(args.adapter)} --adapter: give one --output per --adapter "
                     "(one merged checkpoint each, one pass over the base), or a single --output for their weighted sum")


def executor(args: argparse.Namespace) -> Any:
    """--ray and its companions: a ``distributed.Ray``, or None to run here."""
    if args.ray is None:
        for flag, given in (("--ray-shards", args.ray_shards), ("--ray-summary", args.ray_summary),
                            ("--ray-group", args.ray_group != 8)):
            if given:
                raise UsageError(f"{flag} only applies with --ray auto|local|HOST:PORT")
        return None
    from ..distributed import Ray

    summary = args.ray_summary
    if summary is None and args.batch is not None:
        summary = args.batch.with_name(args.batch.stem + ".summary.json")
    elif summary is None and args.output and len(args.output) == 1:
        summary = args.output[0].with_name(args.output[0].name + ".ray-summary.json")
    return Ray(args.ray, group=args.ray_group, shards=args.ray_shards, summary=summary)


def input_options(args: argparse.Namespace) -> dict[str, Any]:
    """The MergeOptions fields the input flags set (shared by merge and plan)."""
    return dict(dtype=args.dtype, maps=args.map, include=args.include, exclude=args.exclude,
                tokenizer=args.tokenizer, allow_duplicate=args.allow_duplicate, strict=args.strict,
                gguf_pre=args.gguf_pre)

"""The API: inputs -> plans -> executor -> reports.

1. validate the arguments and options (``MergeOptions``); open the base (index + every header; a
   Hub base without its shards) and the adapters; build one plan per output (no tensor data read);
2. check each output directory (and, before the first write, the free disk space);
3. size one set of reusable buffers from ``max_mem``, shared by every output (``run/compute.py``);
4. the executor walks the base shard by shard: untouched tensors copied byte for byte, touched ones
   merged in row chunks, each shard staged, fsynced and recorded (``run/executor.py``);
5. each output's sink copies the non-weight files, writes the index and publishes (``output/sink.py``).
Events (``events.py``) report progress to listeners: the progress bar, ``on_event=``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import OptionTypeError
from .events import Events, Listener, ProgressBar
from .inputs import AdapterSpec, Inputs, adapter_specs, open_inputs
from .memory import peak_rss
from .options import GGUF_ONLY, MergeOptions
from .output.card import merge_card
from .output.directory import check_output, default_output
from .output.sink import SafetensorsSink
from .output.upload import Uploader
from .plan.summary import quantized
from .plan.types import MergePlan
from .report import MergeReport, Survival
from .run.compute import Compute, ComputeSummary, Runtime
from .run.executor import LocalExecutor
from .run.task import Target, tensor_kind
from .run.workingset import WorkingSet
from .sources import hub, modelscope
from .sources.fetch import HubShards, LocalShards

PathLike = Union[str, "os.PathLike[str]"]
AdapterArg = Union[AdapterSpec, PathLike]
__all__ = ["merge", "merge_many", "AdapterSpec", "MergeReport"]


def merge(base: PathLike, adapters: AdapterArg | Sequence[AdapterArg], *, output: PathLike | None = None,
          on_event: Listener | None = None, hub_api: Any = None, executor: Any = None, **options: Any) -> MergeReport:
    """Merge adapters into a safetensors checkpoint, shard by shard, within ``max_mem`` bytes.

    Each touched weight becomes ``W + sum_i w_i * s_i * (B_i @ A_i)`` computed in float32 and
    rounded once to the output dtype (``s = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    Untouched tensors are copied byte for byte. ``adapters``: one path (or ``AdapterSpec``) or a
    list. Options are ``MergeOptions`` fields (``max_mem=4 * 2**30`` or ``"4GB"``, ``device``,
    ``dtype``, ...); a wrong type or value raises TypeError / ValueError naming the argument. Bad
    input raises a StreamMergeError subclass before anything is written. An interrupted run (signal,
    full disk, kill) leaves its finished shards in ``output/.streammerge-partial``; the same call
    again resumes from them. ``on_event`` receives every ``events.Event``.

    ``base`` and adapters may be Hub repo ids (``org/name[@rev]``): the base's shards are then
    downloaded one at a time as the merge reaches them (``low_disk``: into a private folder, each
    deleted once merged). ``push_to_hub``: upload the result as one commit with a model card.
    ``executor``: where the work runs (None: here; ``streammerge.distributed.Ray(...)``: a cluster).
    """
    return merge_many(base, [(adapters, output)], on_event=on_event, hub_api=hub_api, executor=executor,
                      **options)[0]


def merge_many(base: PathLike, jobs: Sequence[tuple[AdapterArg | Sequence[AdapterArg], PathLike | None]], *,
               on_event: Listener | None = None, hub_api: Any = None, executor: Any = None,
               **options: Any) -> list[MergeReport]:
    """Several merged checkpoints from one pass over the base: ``jobs`` is a list of (adapters,
    output); each output is what ``merge(base, adapters, output=output)`` would write, and the base
    is read once for all of them, within the same ``max_mem``.

    ``executor``: None runs here; an object with ``run(base, jobs, options, events)`` returning the
    reports runs elsewhere: ``streammerge.distributed.Ray(address, group=8)`` spreads the jobs over a
    Ray cluster, ``Ray(address, shards=True)`` one output's shards (see the README's cluster section)."""
    opts = MergeOptions.build(**options)
    checked = _jobs(base, jobs)
    events = Events([ProgressBar(enabled=opts.progress)] + ([on_event] if on_event is not None else []))
    try:
        reports = (_merge_many(base, checked, opts, events, hub_api) if executor is None else
                   executor.run(base, checked, opts, events))
    except BaseException as exc:
        events.emit("failed", error=str(exc) or type(exc).__name__, exit_code=int(getattr(exc, "exit_code", 1)))
        raise
    for r in reports:  # what the run noticed, as the report says it
        for text in r.warnings + r.notes:
            events.emit("note", r.output, text=text)
    events.emit("finished", reports=[r.to_dict() for r in reports])
    return reports


def _path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise OptionTypeError(f"{name} must be a path or a repo id (str or os.PathLike), not {type(value).__name__}")


def _jobs(base: Any, jobs: Any) -> list[tuple[list[AdapterSpec], Path | None]]:
    _path("base", base)
    if isinstance(jobs, (str, os.PathLike)) or not isinstance(jobs, Sequence) or not jobs:
        raise OptionTypeError("jobs must be a non-empty list of (adapters, output) pairs")
    out: list[tuple[list[AdapterSpec], Path | None]] = []
    for job in jobs:
        if not isinstance(job, (tuple, list)) or len(job) != 2:
            raise OptionTypeError(f"each job must be an (adapters, output) pair, got {job!r}")
        adapters, output = job
        if output is not None:
            _path("output", output)
        out.append((adapter_specs(adapters), None if output is None else Path(output)))
    return out


@dataclass
class _Output:
    plan: MergePlan
    out: Path
    warnings: list[str]


def _merge_many(base: PathLike, jobs: list[tuple[list[AdapterSpec], Path | None]], opts: MergeOptions,
                events: Events, hub_api: Any) -> list[MergeReport]:
    started = time.perf_counter()
    runtime = Runtime()  # torch loads in the background while the plan is built
    uploader = _uploader(opts, jobs, hub_api)
    scratch = Path(tempfile.mkdtemp(prefix="streammerge-")) if opts.low_disk else None  # Hub files, not the cache
    try:
        inputs, outputs, sinks = _prepared(base, jobs, opts, scratch, uploader)
        compute = _compute(outputs, sinks, opts, runtime, uploader)
        source = (HubShards(inputs.hub_base, private=sinks[0].fetch_dir if opts.low_disk else None)
                  if inputs.hub_base else LocalShards())
        executor = LocalExecutor(compute, events, source=source, hub_base=inputs.hub_base, low_disk=opts.low_disk)
        survival = Survival()
        events.listen(survival)
        executor.run([Target(o.plan, sink, events) for o, sink in zip(outputs, sinks)])
    finally:
        if uploader is not None:
            uploader.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    assert executor.stats is not None
    seconds = time.perf_counter() - started
    downloaded = len(source.fetched) if isinstance(source, HubShards) else None
    reports = [_report(o, sink, opts, executor.stats, compute.notes, inputs, seconds, downloaded)
               for o, sink in zip(outputs, sinks)]
    for report in reports:
        report.requantized = survival.by_output.get(report.output, {})
        report.warnings += [w for w in [survival.warning(report.output)] if w]
    return reports


def _prepared(base: PathLike, jobs: list[tuple[list[AdapterSpec], Path | None]], opts: MergeOptions,
              scratch: Path | None, uploader: Uploader | None) -> tuple[Inputs, list[_Output], list[Any]]:
    """Steps 1 and 2: the inputs opened, one plan and one sink per output, every output checked."""
    named = [str(base)] + [str(a.path) for adapters, _ in jobs for a in adapters]
    if uploader or any(hub.is_repo_id(n) for n in named):
        hub.progress_bars(opts.progress)
    inputs = open_inputs(base, opts, small_files_dir=scratch)
    outputs = [_output(inputs, adapters, output, opts, scratch) for adapters, output in jobs]
    _check_distinct([o.out for o in outputs])
    sinks = [_gguf_sink(o, opts, inputs) if o.out.suffix == ".gguf" else
             SafetensorsSink(o.plan, o.out, checksum=opts.checksum, options=opts.recorded(),
                             card=functools.partial(merge_card, o.plan, inputs, adapters, opts),
                             uploader=uploader if i == 0 else None, low_disk=opts.low_disk)
             for i, (o, (adapters, _)) in enumerate(zip(outputs, jobs))]
    return inputs, outputs, sinks


@dataclass
class Planned:
    """What a driver that runs the merge elsewhere (``distributed``) checks first: every output's
    plan and sink, the shared working set (a budget too small refused), and the free disk space for
    every output (less what earlier runs staged)."""

    inputs: Inputs
    outputs: list[_Output]
    sinks: list[Any]
    working_set: WorkingSet


def plan_outputs(base: PathLike, jobs: Sequence[tuple[AdapterArg | Sequence[AdapterArg], PathLike | None]],
                 opts: MergeOptions) -> Planned:
    """Everything ``merge_many`` refuses before its first write, with nothing written and no lock."""
    from .output.manifest import staged_shards
    from .output.space import check_disk

    if opts.push_to_hub or opts.low_disk:
        from .errors import UsageError

        raise UsageError("--push-to-hub and --low-disk are not available on a cluster yet: merge there, then "
                         "upload, or run on one machine")
    inputs, outputs, sinks = _prepared(base, _jobs(base, jobs), opts, None, None)
    for sink in sinks:
        if isinstance(sink, SafetensorsSink):
            sink.kept = staged_shards(sink.staging, list(sink.plan.shards))
    check_disk(sinks, inputs.hub_base, low_disk=opts.low_disk)
    return Planned(inputs, outputs, sinks, _working_set(outputs, sinks, opts))


def merge_shards(base: PathLike, adapters: AdapterArg | Sequence[AdapterArg], output: PathLike, shards: list[str],
                 *, on_event: Listener | None = None, **options: Any) -> dict[str, Any]:
    """One worker's part of a merge spread over machines: ``shards`` of ``output``, written into the
    staging area the driver owns (``output/shardfiles.py``); no lock, no publish, no other file.
    Returns each shard's record and what the worker ran on."""
    from .output.shardfiles import ShardFilesSink

    opts = MergeOptions.build(**options)
    events = Events([on_event] if on_event is not None else [])
    started = time.perf_counter()
    inputs = open_inputs(base, opts)
    plan, notes = inputs.plan(adapter_specs(adapters), opts)
    sink = ShardFilesSink(plan, Path(output), shards, checksum=opts.checksum)
    compute = _compute([_Output(plan, Path(output), notes)], [sink], opts, Runtime(), None)
    source = HubShards(inputs.hub_base, private=None) if inputs.hub_base else LocalShards()  # (the node's cache)
    executor = LocalExecutor(compute, events, source=source, hub_base=inputs.hub_base, low_disk=False)
    executor.run([Target(plan, sink, events)])
    assert executor.stats is not None
    return {"records": sink.records, "device": executor.stats.device, "peak_rss": peak_rss(),
            "peak_gpu": executor.stats.peak_gpu, "seconds": time.perf_counter() - started}


def _uploader(opts: MergeOptions, jobs: list[Any], hub_api: Any) -> Uploader | None:
    if not opts.push_to_hub:
        return None
    if len(jobs) != 1:
        from .errors import OutputError

        raise OutputError("--push-to-hub takes a single output; push the others in separate runs")
    return Uploader(opts.push_to_hub, private=opts.private, revision=opts.hub_revision, delete_after=opts.low_disk,
                    api=hub_api)


def _output(inputs: Inputs, adapters: list[AdapterSpec], output: Path | None, opts: MergeOptions,
            scratch: Path | None) -> _Output:
    gguf_file = output is not None and output.suffix == ".gguf"
    if gguf_file:  # merged as the checkpoint's own dtypes, then converted to the GGUF type by the sink
        from .formats.gguf_layout import outtype

        outtype(opts.dtype if opts.dtype != "auto" else "bf16")
    elif opts.dtype in GGUF_ONLY:
        from .errors import OptionValueError

        raise OptionValueError(f"--dtype {opts.dtype} is a GGUF type: give an --output ending in .gguf")
    plan_opts = dataclasses.replace(opts, dtype="auto") if gguf_file else opts
    plan, notes = inputs.plan(adapters, plan_opts, small_files_dir=scratch)
    out = _output_dir(inputs.text, output)
    if gguf_file:
        check_output_file(out, overwrite=opts.overwrite)
    else:
        check_output(out, base=plan.base.root, adapters=[a.path for a in plan.adapters], overwrite=opts.overwrite)
    return _Output(plan, out, notes)


def _gguf_sink(o: _Output, opts: MergeOptions, inputs: Inputs) -> Any:
    """The GGUF file of one output: its layout and metadata from the plan and the base's config;
    general.name from the base's folder or Hub repo name, as the converter takes it from the folder."""
    from .formats.gguf_layout import layout
    from .formats.gguf_meta import read_config
    from .output.gguf import GgufSink

    root = o.plan.base.root
    config = read_config(root)
    tokenizer_dir = o.plan.tokenizer_from or root
    dtype = opts.dtype if opts.dtype != "auto" else _auto_outtype(o.plan)
    folder = inputs.hub_base.repo.split("/")[-1] if inputs.hub_base else root.name
    return GgufSink(o.plan, o.out, layout=layout(o.plan, dtype, config), config=config,
                    tokenizer_dir=Path(tokenizer_dir), pre=opts.gguf_pre,
                    name=folder.replace("-", " ").title() if folder else "model")


def plan_gguf(inputs: Inputs, adapters: list[AdapterSpec], output: Path, opts: MergeOptions) -> tuple[
        MergePlan, list[str], dict[str, Any]]:
    """``plan --output FILE.gguf``: the merge's plan, and the GGUF file it would write (each tensor's
    GGUF name, type and shape, the file's size, the free space), checked as a merge checks it: every
    refusal (architecture, tokenizer, file type, output file, disk) now, nothing written."""
    from .output.directory import check_free_space

    o = _output(inputs, adapters, output, opts, None)
    sink = _gguf_sink(o, opts, inputs)
    check_free_space(o.out, sink.size, what="the GGUF file")
    parts = sink.layout.files()
    types = dict(collections.Counter(group[0].qtype for group in parts.values()))
    return o.plan, o.warnings, {
        "path": str(o.out), "architecture": sink.layout.arch_name, "file_type": sink.layout.file_type,
        "bytes": sink.size, "held_bytes": sink.held_bytes(), "free_bytes": shutil.disk_usage(o.out.parent).free,
        "types": types, "tensors": [{"name": name, "type": group[0].qtype, "shape": list(group[0].gguf_shape),
                     "from": [t.name for t in group]} for name, group in parts.items()]}


def _auto_outtype(plan: MergePlan) -> str:
    """--dtype auto for GGUF, the converter's guess: the first 2-D tensor that is BF16 or F16 decides
    (F32 ones are passed over); f16 when there is none."""
    for t in plan.tensors():
        if len(t.info.shape) >= 2 and t.out_dtype in ("BF16", "F16"):
            return "bf16" if t.out_dtype == "BF16" else "f16"
    return "f16"


def check_output_file(out: Path, *, overwrite: bool) -> None:
    from .errors import OutputError

    if out.is_dir():
        raise OutputError(f"--output {out} is a directory; a GGUF output is one file ending in .gguf")
    if out.exists() and not overwrite:
        raise OutputError(f"--output {out} exists; pass --overwrite to replace it, or choose another file")
    if not out.parent.is_dir():
        raise OutputError(f"--output {out}: its folder {out.parent} does not exist")


def _output_dir(base: str, output: Path | None) -> Path:
    if output is not None:
        return output
    if hub.is_repo_id(base) or modelscope.is_modelscope_id(base):  # never beside a snapshot inside a cache
        return Path.cwd() / f"{base.split('@')[0].split('/')[-1]}-merged"
    return default_output(Path(base))


def _check_distinct(outs: list[Path]) -> None:
    from .errors import OutputError

    resolved = [o.resolve() for o in outs]
    for i, a in enumerate(resolved):
        for b in resolved[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise OutputError(f"--output {a} and {b} overlap; give each adapter its own output directory")


def _compute(outputs: list[_Output], sinks: list[Any], opts: MergeOptions, runtime: Runtime,
             uploader: Uploader | None) -> Compute:
    """One set of buffers for every output, beside what the sinks hold (a budget too small is refused
    now, before any write); a missing CUDA device or a refused Hub token fails here too."""
    compute = Compute(_working_set(outputs, sinks, opts), opts.device, runtime, reserve_core=opts.checksum)
    try:
        if opts.device != "cpu":
            compute.start()
        if uploader is not None:
            uploader.open()
    except BaseException:
        compute.close()
        raise
    return compute


def _working_set(outputs: list[_Output], sinks: list[Any], opts: MergeOptions) -> WorkingSet:
    held = sum(sink.held_bytes() for sink in sinks)
    return WorkingSet.combine([WorkingSet.of(o.plan, opts.max_mem, held=held) for o in outputs], opts.max_mem)


def spread_report(planned: Planned, sink: SafetensorsSink, opts: MergeOptions, *, device: str, baseline_rss: int,
                  peak_gpu: int | None, seconds: float) -> MergeReport:
    """The report of one output whose shards other processes merged (``merge_shards``): figures
    of the workers, the rest from the plan and the sink as for a local merge."""
    stats = ComputeSummary(device, baseline_rss, planned.working_set.chunk_elements, peak_gpu)
    return _report(planned.outputs[0], sink, opts, stats, [], planned.inputs, seconds, None)


def _report(o: _Output, sink: SafetensorsSink, opts: MergeOptions, stats: ComputeSummary, notes: list[str],
            inputs: Inputs, seconds: float, downloaded: int | None) -> MergeReport:
    plan = o.plan
    report = MergeReport(str(o.out), stats.device, opts.max_mem, opts.dtype, shards=len(plan.shards),
                         shards_resumed=len(sink.kept), seconds=seconds, baseline_rss=stats.baseline_rss,
                         peak_rss=peak_rss(), peak_gpu=stats.peak_gpu, chunk_elements=stats.chunk_elements)
    for t in plan.tensors():
        kind = tensor_kind(t)
        setattr(report, f"tensors_{kind}", getattr(report, f"tensors_{kind}") + 1)
        if kind == "merged" and t.source is not None:  # merged on top of a weight saved with the adapter
            report.tensors_replaced += 1
            report.tensors_merged_on_replaced += 1
    report.adapter_modules = sum(len(a.modules) for a in plan.adapters)
    report.bytes_written = sink.bytes_to_write()
    report.files_copied, report.pushed_to = sink.files_copied, sink.pushed_to
    report.excluded = plan.excluded
    report.tensors_excluded = len(plan.excluded)
    report.tokenizer_from = str(plan.tokenizer_from) if plan.tokenizer_from else None
    report.quantized = quantized(plan)
    scheme = plan.dequantized or plan.requantized
    report.base_kind = f"quantized ({scheme})" if scheme else "16-bit"
    report.warnings = list(o.warnings)
    report.notes = plan.notes + notes + ([sink.tokenizer_note] if sink.tokenizer_note else []) + sink.notes
    if downloaded is not None:
        report.shards_downloaded = downloaded
    if inputs.hub_base is not None:
        report.base_commit = inputs.hub_base.commit
    elif opts.low_disk and not opts.push_to_hub:
        report.notes.append("--low-disk changed nothing: the base is a local directory, nothing was downloaded")
    return report

"""What the command line prints: reports, plans and verify results, as text or one JSON object."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..events import Event
from ..memory import format_size


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, default=str))


def print_reports(reports: list[dict[str, Any]]) -> None:
    for report in reports:
        _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
    on_top = report.get("tensors_merged_on_replaced", 0)
    also = f" ({on_top} of them also merged)" if on_top else ""
    print(f"merged {report['tensors_merged']} tensors ({report['adapter_modules']} adapter modules), "
          f"replaced {report['tensors_replaced']}{also}, converted {report['tensors_converted']}, "
          f"copied {report['tensors_copied']} unchanged -> {report['output']}")
    gpu = f", GPU peak {format_size(report['peak_gpu'])}" if report.get("peak_gpu") is not None else ""
    resumed = f" ({report['shards_resumed']} resumed from an earlier run)" if report["shards_resumed"] else ""
    print(f"{report['shards']} shard(s){resumed}, {format_size(report['bytes_written'])} written in "
          f"{report['seconds']:.1f} s on {report['device']}; peak RSS {format_size(report['peak_rss'])} (baseline "
          f"{format_size(report['baseline_rss'])}, budget {format_size(report['max_mem'])}){gpu}")
    if report.get("base_commit"):
        print(f"base read from the Hub at commit {report['base_commit']}: {report['shards_downloaded']} shard(s) "
              "downloaded by this run")
    if report.get("quantized"):
        print(f"quantized base ({report['quantized']['scheme']}): {_quantized(report['quantized'])}")
    if report.get("requantized"):
        kept = sorted(report["requantized"].values())
        print(f"re-quantized: {len(kept)} weights kept {kept[0]:.0%} (least) to {kept[-1]:.0%} of their delta "
              "(survives, per tensor, in --json)")
    if report.get("cluster"):
        c = report["cluster"]
        where = f"node {c['host']} ({c['node'][:12]})" if "node" in c else f"{len(c['nodes'])} node(s)"
        print(f"on the cluster: {where}, {c['retries']} retried task(s)")
    if report.get("pushed_to"):
        print(f"pushed: {report['pushed_to']}")
    if report.get("excluded"):
        print(f"excluded by --include/--exclude ({len(report['excluded'])}): {', '.join(report['excluded'][:5])}"
              + (" ..." if len(report["excluded"]) > 5 else "") + " (all listed in streammerge.json)")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}")
    for note in report["notes"]:
        print(f"note: {note}")


def print_plan(summary: dict[str, Any], *, verbose: bool) -> None:
    if verbose:
        for m in summary["modules"]:
            print(f"{m['adapter']}: {m['module']} -> {m['tensor']}  [{m['kind']}, r={m['r']} scale={m['scale']:g}; "
                  f"{m['rule']}]")
    else:
        for g in summary["groups"]:
            print(f"{g['adapter']}: {g['tensors']}  x{g['count']}  [{g['method']}, r={g['r']} scale={g['scale']:g}; "
                  f"{g['rule']}]")
    for tensor, source in summary["replaced"].items():
        print(f"replaced: {tensor} <- {source}")
    for tensor, ids in summary["token_rows"].items():
        print(f"token rows: {tensor} rows {ids}")
    for tensor in summary["added"]:
        print(f"added: {tensor}")
    for item in summary["excluded"]:
        print(f"excluded: {item}")
    for key, value in summary["config_changes"].items():
        print(f"config.json: {key} = {json.dumps(value)}")
    if summary["tokenizer_from"]:
        print(f"tokenizer from: {summary['tokenizer_from']} ({summary['tokenizer_why']})")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")
    for note in summary.get("notes", []):
        print(f"note: {note}")
    if summary.get("quantized"):
        q = summary["quantized"]
        print(f"quantized base ({q['scheme']}): {_quantized(q)}; {format_size(q['bytes_in'])} in, "
              f"{format_size(q['bytes_out'])} out")
        for f in q["families"]:
            print(f"  {f['tensors']}  x{f['count']}  [{f['scheme']} {f['params']}]")
    memory = summary["memory"]
    print(f"{summary['tensors_merged']} of {summary['tensors_total']} output tensors change; "
          f"output {format_size(summary['output_bytes'])}, dtype {summary['out_dtype']}; working set "
          f"{format_size(memory['working_set_bytes'])} of --max-mem {format_size(memory['max_mem'])} "
          f"(chunks of {memory['chunk_elements']} elements)")
    if summary.get("gguf"):
        _print_gguf(summary["gguf"], verbose=verbose)
    if summary.get("output"):
        out = summary["output"]
        print(f"output {out['path']}: allowed; {format_size(out['free_bytes'])} free, {format_size(out['needed_bytes'])} "
              "needed")


def _print_gguf(g: dict[str, Any], *, verbose: bool) -> None:
    """The GGUF file a merge would write: its tensors (each, or how many of each type) and size."""
    if verbose:
        for t in g["tensors"]:
            parts = t["from"][0] if len(t["from"]) == 1 else f"{t['from'][0]} ... ({len(t['from'])} stacked)"
            print(f"gguf: {t['name']} {t['type']} {t['shape']} <- {parts}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(g["types"].items()))
    print(f"gguf {g['path']}: {g['architecture']} {g['file_type']}, {len(g['tensors'])} tensors ({types}); "
          f"{format_size(g['bytes'])}, {format_size(g['free_bytes'])} free")


def print_verify(result: dict[str, Any], *, quiet: bool) -> None:
    for problem in result["problems"]:
        print(f"DIFFERS: {problem}")
    if quiet and result["ok"]:
        return
    for note in result.get("notes", []):
        print(f"note: {note}")
    verdict = "verified" if result["ok"] else "NOT verified"
    if result.get("kind") == "gguf":
        print(f"{verdict}: {result['output']}: layout as the merge writes it; {result['tensors_sampled']} tensors "
              f"sampled ({result['rows_sampled']} rows, dequantized; worst {result['max_error_ratio']:.2f} of what "
              "the merge's rounding and the GGUF type allow)")
        return
    print(f"{verdict}: {result['output']}: {result['tensors_compared']} untouched tensors compared byte for byte, "
          f"{result['tensors_sampled']} merged tensors sampled ({result['rows_sampled']} rows, worst "
          f"{result['max_error_ratio']:.2f} of the one-rounding bound), {result['shards_hashed']} shard checksums")


class PlanLine:
    """Prints one line to stderr as soon as the plan is ready (before any shard is written)."""

    def __call__(self, event: Event) -> None:
        if event.kind != "plan":
            return
        done = f", {format_size(event.data['bytes_done'])} already done" if event.data["bytes_done"] else ""
        outputs = event.data["outputs"]
        where = outputs[0] if len(outputs) == 1 else f"{len(outputs)} outputs"
        print(f"streammerge: writing {format_size(event.data['bytes_out'])} in {event.data['shards']} shard(s) to "
              f"{where}{done}", file=sys.stderr, flush=True)


class OutputLine(PlanLine):
    """The plan line, then on a cluster a line for each output as it is published."""

    def __call__(self, event: Event) -> None:
        super().__call__(event)
        if event.kind == "output_done":
            retries = event.data["retries"]
            again = f" ({retries} retr{'y' if retries == 1 else 'ies'})" if retries else ""
            print(f"streammerge: {event.output} done on {event.data.get('host') or event.data['node']} in "
                  f"{event.data['seconds']:.1f} s{again}", file=sys.stderr, flush=True)


def _quantized(q: dict[str, Any]) -> str:
    """What becomes of a quantized base's weights: dequantized, or written back (--dtype fp8)."""
    if q.get("requantized") is None:
        return f"{q['tensors']} weights dequantized to {q['dtype']}"
    return (f"written back in its scheme: {q['requantized']} merged weights re-quantized, "
            f"{q['tensors'] - q['requantized']} copied byte for byte")

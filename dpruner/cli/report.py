"""`dpruner report`: compare any two models side by side (size, MACs, latency, accuracy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpruner.cli import training as t
from dpruner.cli.errors import handle_errors
from dpruner.cli.options import ArchOpt, InputShapeOpt, JsonOpt, JunitOpt, NumClassesOpt, RequireOpt, TrustOpt
from dpruner.cli.output import emit_json, stdout_console

HELP = "Compare two models side by side: params, MACs, file sizes, PyTorch and ONNX Runtime latency, accuracy with --data."


def parse_batches(text: str) -> tuple[int, ...]:
    from dpruner.errors import InputError

    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except (ValueError, OverflowError):
        raise InputError(f"--batches must be comma-separated integers such as 1,8, got '{text}'.") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batches must be comma-separated positive integers such as 1,8, got '{text}'.")
    return sizes


MAX_BATCH = 4096  # timing a larger batch says nothing a smaller one does not, and risks exhausting memory
MAX_THREADS = 1024


def check_batches(sizes: tuple[int, ...], shape) -> None:
    """Every timed batch must be at most MAX_BATCH and its input within the example-input size limit."""
    from dpruner.errors import InputError
    from dpruner.io.shapes import check_input_elements

    if max(sizes) > MAX_BATCH:
        raise InputError(f"--batches sizes must be at most {MAX_BATCH}, got {max(sizes)}.")
    check_input_elements((max(sizes), *shape[1:]), "--batches")


def check_threads(threads: int | None) -> int | None:
    from dpruner.errors import InputError

    if threads is not None and threads > MAX_THREADS:
        raise InputError(f"--threads must be at most {MAX_THREADS}, got {threads}.")
    return threads


def load_side(path: Path, *, arch, num_classes, trust, input_shape, shape=None):
    """Load one model and settle the input shape (an explicit option, else the checkpoint's, else torchvision's)."""
    from dpruner.io import load_checkpoint
    from dpruner.io.shapes import resolve_input_shape

    import torch

    from dpruner.metrics.macs import run_forward

    loaded = load_checkpoint(path, arch=arch, num_classes=num_classes, trust_checkpoint=trust)
    if shape is None:
        shape, _ = resolve_input_shape(input_shape, stored=loaded.input_shape, arch=loaded.arch, source=str(path),
                                       model=loaded.model)
    run_forward(loaded.model.eval(), torch.randn(*shape))  # the model must run: say so now, not mid-export
    return loaded, tuple(shape)


def accuracy_of(model, bundle) -> dict | None:
    """Top-1 per split on --data (None without data): measured before anything is written, since the data may be
    what is at fault."""
    if bundle is None:
        return None
    from dpruner.train.api import evaluate_splits

    return {k: v.accuracy for k, v in evaluate_splits(model, bundle).items()}


def facts_for(model, shape, path, bundle, batches, threads, latency, onnx_path=None, memory=False, export=None,
              accuracy=None):
    from dpruner.report.compare import measure_model

    if accuracy is None:
        accuracy = accuracy_of(model, bundle)
    return measure_model(model, shape, source=str(path), pt_path=path, onnx_path=onnx_path, batches=batches,
                         threads=threads, latency=latency, accuracy=accuracy, memory=memory, export=export)


def prepare_gates(require, junit, *, inputs, outputs=(), data: bool, latency: bool, before: bool,
                  batches: tuple[int, ...]):
    """Parse --require and check --junit before any slow work: a gate the run would not measure is a usage error."""
    from dpruner.io.atomic import check_not_input, check_output_path
    from dpruner.report.gates import check_measurable, parse_gate

    gates = [parse_gate(text) for text in require or ()]
    if junit is not None:
        if not gates:
            from dpruner.errors import InputError

            raise InputError("--junit writes the --require gates: give at least one --require.")
        check_output_path(junit, "--junit")
        check_not_input(junit, [*inputs, *outputs])
    check_measurable(gates, data=data, latency=latency, before=before, batches=batches)
    return gates


def apply_gates(doc: dict, gates, junit, inputs) -> list:
    """Evaluate the gates into the report (doc['gates']) and write --junit; returns the results."""
    from dpruner.io.atomic import atomic_write_bytes
    from dpruner.report.gates import evaluate_gates, junit_xml

    if not gates:
        return []
    results = evaluate_gates(doc, gates)
    doc["gates"] = [r.to_json() for r in results]
    if junit is not None:
        atomic_write_bytes(junit, junit_xml(results).encode(), inputs=inputs)
    return results


def fail_on_gates(results) -> None:
    """Exit 1 with one line naming every failed gate."""
    failed = [r for r in results if not r.passed]
    if failed:
        from dpruner.cli.output import print_error
        from dpruner.errors import EXIT_TARGET_NOT_MET

        print_error("gate failed: " + " ".join(r.reason for r in failed))
        raise typer.Exit(EXIT_TARGET_NOT_MET)


def print_gates(out, results) -> None:
    for r in results:
        mark = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        out.print(f"gate {mark} {r.reason}")


def write_markdown(path: Path, doc: dict, title: str, inputs) -> None:
    from dpruner.io.atomic import atomic_write_bytes
    from dpruner.report.render import markdown

    atomic_write_bytes(path, markdown(doc, title).encode(), inputs=inputs)


@handle_errors
def report(
    before: Annotated[Path, typer.Argument(metavar="BEFORE", help="The original model.", show_default=False)],
    after: Annotated[Path, typer.Argument(metavar="AFTER", help="The model to compare with it (e.g. the pruned one).", show_default=False)],
    data: t.DataOpt = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the report as a Markdown table.")] = None,
    batches: Annotated[str, typer.Option("--batches", help="Batch sizes timed, comma-separated.")] = "1,8",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Intra-op threads (default: all cores).")] = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure latency.")] = True,
    memory: Annotated[bool, typer.Option("--memory", help="Also measure the peak memory of one forward per runtime and batch (a fresh process each; adds seconds).")] = False,
    require: RequireOpt = None,
    junit: JunitOpt = None,
    batch_size: t.BatchSizeOpt = 128,
    val_fraction: t.ValFractionOpt = 0.1,
    val_from: t.ValFromOpt = "train",
    mean: t.MeanOpt = None,
    std: t.StdOpt = None,
    workers: t.WorkersOpt = 0,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    input_shape: InputShapeOpt = None,
    trust_checkpoint: TrustOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Compare BEFORE and AFTER (either may be a state_dict with --arch or a dpruner checkpoint)."""
    from dpruner.report.compare import build_report
    from dpruner.report.latency import default_threads
    from dpruner.report.render import footer, rich_table

    from dpruner.io.atomic import check_not_input

    from dpruner.io.atomic import check_output_path

    if markdown is not None:
        check_output_path(markdown, "--markdown")
        check_not_input(markdown, [before, after])
    n_threads = check_threads(threads) or default_threads()
    sizes = parse_batches(batches)
    gates = prepare_gates(require, junit, inputs=[before, after], outputs=[markdown] if markdown else [],
                          data=data is not None, latency=latency, before=True, batches=sizes)
    after_loaded, shape = load_side(after, arch=arch, num_classes=num_classes, trust=trust_checkpoint,
                                    input_shape=input_shape)
    check_batches(sizes, shape)
    before_loaded, _ = load_side(before, arch=arch, num_classes=num_classes, trust=trust_checkpoint,
                                 input_shape=input_shape, shape=shape)
    bundle = None
    if data is not None:
        from dpruner.train.distributed import DistContext

        bundle = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=workers,
                               val_fraction=val_fraction, val_from=val_from, seed=0, download=False, ctx=DistContext(), mean=mean, std=std)
    doc = build_report(facts_for(after_loaded.model, shape, after, bundle, sizes, n_threads, latency, memory=memory),
                       facts_for(before_loaded.model, shape, before, bundle, sizes, n_threads, latency, memory=memory),
                       threads=n_threads)
    title = f"{before} -> {after}"
    results = apply_gates(doc, gates, junit, [before, after])
    if markdown is not None:
        write_markdown(markdown, doc, title, [before, after])
    if json_output:
        emit_json(doc)
    else:
        out = stdout_console()
        out.print(rich_table(doc, title))
        print_gates(out, results)
        out.print(f"[dim]{footer(doc)}[/dim]")
    fail_on_gates(results)

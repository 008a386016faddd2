"""`dpruner export`: ONNX with a verification run and, given --baseline, a before/after report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpruner.cli import training as t
from dpruner.cli.errors import handle_errors
from dpruner.cli.options import (ArchOpt, InputShapeOpt, JsonOpt, JunitOpt, ModelArg, NumClassesOpt, RequireOpt,
                                 TrustOpt)
from dpruner.cli.output import emit_json, print_error, stdout_console

HELP = ("Export to ONNX (verified in ONNX Runtime) and/or a torch.export .pt2 program (verified after loading it back) "
        "and report size, MACs and latency (vs --baseline).")

BatchesOpt = Annotated[str, typer.Option("--batches", help="Batch sizes timed, comma-separated.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="Intra-op threads for PyTorch and ONNX Runtime (default: all cores).")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write the report as a Markdown table (for a pull-request comment).")]
LatencyOpt = Annotated[bool, typer.Option("--latency/--no-latency", help="Measure latency (the slow part of a report).")]


@handle_errors
def export(
    model: ModelArg,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Where to write the ONNX file (never an input file).")] = None,
    torch_program: Annotated[Optional[Path], typer.Option("--torch", help="Also (or instead) write a torch.export program (.pt2, dynamic batch) that torch.export.load runs with only torch installed: no dpruner, no model code.")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="The original model: adds the before column and ratios.")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 17,
    exporter: Annotated[str, typer.Option("--exporter", help="torchscript (default: torch.onnx.export(dynamo=False)) or dynamo.")] = "torchscript",
    static_batch: Annotated[bool, typer.Option("--static-batch", help="Fix the batch dimension (default: dynamic).")] = False,
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify the graph with onnxslim; the result is verified the same way.")] = False,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance: every output element must satisfy |onnxruntime - torch| <= atol + rtol * (the output's largest |torch| value); otherwise exit 3.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance of that rule (large outputs, e.g. random-weight logits, round further).")] = 1e-4,
    int8: Annotated[bool, typer.Option("--int8", help="Write the --onnx file quantized to INT8 with ONNX Runtime's static quantization (QDQ, per-channel weights) calibrated on --calib-batches training batches of --data, and check it against the float model on the test split (else validation): exit 3 when top-1 drops by more than --int8-tolerance.")] = False,
    calib_batches: Annotated[int, typer.Option("--calib-batches", min=1, help="--int8: training batches the activation ranges are calibrated on.")] = 8,
    int8_tolerance: Annotated[str, typer.Option("--int8-tolerance", help="--int8: the most top-1 the INT8 model may lose against the float model, e.g. 1% (points).")] = "1%",
    keep_on_failure: Annotated[bool, typer.Option("--keep-on-failure", help="Write the ONNX file even when verification fails (exit code still 3).")] = False,
    data: t.DataOpt = None,
    markdown: MarkdownOpt = None,
    batches: BatchesOpt = "1,8",
    threads: ThreadsOpt = None,
    latency: LatencyOpt = True,
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
    """Export MODEL to ONNX and/or a .pt2 program and report on it."""
    from dpruner.errors import EXIT_VERIFICATION_FAILED
    from dpruner.errors import InputError
    from dpruner.export.api import export_int8, export_model, export_torch_program
    from dpruner import validate
    from dpruner.cli.report import (accuracy_of, apply_gates, check_batches, check_threads, fail_on_gates,
                                    load_side, parse_batches, prepare_gates, print_gates, write_markdown)
    from dpruner.export.onnx import check_export_options
    from dpruner.io.atomic import check_not_input, check_output_path
    from dpruner.report.latency import default_threads

    # Every input is read and checked before anything is written: a bad --baseline or --data leaves no file behind.
    inputs = [model, baseline]
    if onnx is None and torch_program is None:
        raise InputError("Give --onnx FILE.onnx and/or --torch FILE.pt2: what to export.")
    outputs = []
    for path, flag in ((onnx, "--onnx"), (torch_program, "--torch")):
        if path is not None:
            check_output_path(path, flag)
            check_not_input(path, [*inputs, *outputs])
            outputs.append(path)
    if markdown is not None:
        check_output_path(markdown, "--markdown")
        check_not_input(markdown, [*inputs, *outputs])
    max_drop = None
    if int8:
        from dpruner.export.int8 import parse_drop

        if onnx is None:
            raise InputError("--int8 quantizes the ONNX export: give --onnx FILE.onnx.")
        if data is None:
            raise InputError("--int8 calibrates on training images and checks the result on held-out ones: give "
                             "--data.")
        if simplify:
            raise InputError("--int8 runs ONNX Runtime's own graph optimisation before quantizing; drop --simplify.")
        max_drop = parse_drop(int8_tolerance)
    validate.number(atol, "--atol", low=0)
    validate.number(rtol, "--rtol", low=0, high=1)
    check_export_options(opset=opset, exporter=exporter)
    n_threads = check_threads(threads) or default_threads()
    sizes = parse_batches(batches)
    gates = prepare_gates(require, junit, inputs=inputs, outputs=[*outputs, *([markdown] if markdown else [])],
                          data=data is not None, latency=latency, before=baseline is not None, batches=sizes)
    after_loaded, shape = load_side(model, arch=arch, num_classes=num_classes, trust=trust_checkpoint,
                                    input_shape=input_shape)
    check_batches(sizes, shape)
    base_loaded = None
    if baseline is not None:
        base_loaded, _ = load_side(baseline, arch=arch, num_classes=num_classes, trust=trust_checkpoint,
                                   input_shape=input_shape, shape=shape)
    bundle = None
    if data is not None:
        from dpruner.train.distributed import DistContext

        bundle = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=workers,
                               val_fraction=val_fraction, val_from=val_from, seed=0, download=False, ctx=DistContext(), mean=mean, std=std)
    accuracy = accuracy_of(after_loaded.model, bundle)  # reads every batch: bad data fails here, before any write
    base_accuracy = accuracy_of(base_loaded.model, bundle) if base_loaded is not None else None
    loader = bundle.test or bundle.val if bundle else None
    result = program = quantized = None
    written = []  # files in place: taken back if a later step fails
    try:
        if int8:
            quantized = export_int8(after_loaded.model, shape, onnx, calib_loader=bundle.train, eval_loader=loader,
                                    eval_split="test" if bundle.test is not None else "val",
                                    calib_batches=calib_batches, max_drop=max_drop, inputs=inputs, opset=opset,
                                    dynamic_batch=not static_batch, exporter=exporter, atol=atol, rtol=rtol,
                                    keep_on_failure=keep_on_failure)
            result = quantized.float_result
            written += [onnx] if quantized.written else []
        elif onnx is not None:
            result = export_model(after_loaded.model, shape, onnx, inputs=inputs, opset=opset,
                                  dynamic_batch=not static_batch, exporter=exporter, simplify=simplify, atol=atol,
                                  rtol=rtol, keep_on_failure=keep_on_failure, loader=loader)
            written += [onnx] if result.written else []
        if torch_program is not None:
            program = export_torch_program(after_loaded.model, shape, torch_program, inputs=inputs,
                                           dynamic_batch=not static_batch, atol=atol, rtol=rtol,
                                           keep_on_failure=keep_on_failure, loader=loader)
            written += [torch_program] if program.written else []
        doc = _report(result, after_loaded, base_loaded, shape, model, baseline, bundle, sizes, n_threads, latency,
                      memory, opset, exporter, static_batch, onnx, accuracy, base_accuracy, quantized)
        if program is not None:
            doc["torch_export"] = {**program.info.to_json(), "written": program.written,
                                   "verification": program.verification.to_json()}
        title = f"{baseline} -> {model}" if baseline else str(model)
        results = apply_gates(doc, gates, junit, inputs)
        if markdown is not None:
            write_markdown(markdown, doc, title, inputs)
    except BaseException:  # a failure after a file appeared (e.g. the report's disk is full): take it back
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if json_output:
        emit_json(doc)
    else:
        from dpruner.report.render import footer, program_line, rich_table, verification_line

        out = stdout_console()
        out.print(rich_table(doc, title))
        from dpruner.report.render import int8_line

        for line in (verification_line(doc), int8_line(doc), program_line(doc)):
            if line:
                out.print(line)
        for done in (result, program):
            if done is not None and done.info.note:
                out.print(f"[yellow]note:[/yellow] {done.info.note}")
        print_gates(out, results)
        out.print(f"[dim]{footer(doc)}[/dim]")
    failed = [(done, path) for done, path in ((result, onnx), (program, torch_program))
              if done is not None and not done.verification.passed]
    if quantized is not None and quantized.check is not None and not quantized.check.passed:
        print_error(f"verification failed: {quantized.check.failure()}; "
                    + (f"'{onnx}' was kept (--keep-on-failure)." if quantized.written else
                       f"'{onnx}' was not written."))
        raise typer.Exit(EXIT_VERIFICATION_FAILED)
    if failed:
        both = onnx is not None and torch_program is not None
        print_error("verification failed: " + " ".join(
            (f"{path.name}: " if both else "") + f"{done.verification.failure()}; "
            + (f"'{path}' was kept (--keep-on-failure)." if done.written
               else f"'{path}' was not written." if both else "no file was written.")
            for done, path in failed))
        raise typer.Exit(EXIT_VERIFICATION_FAILED)
    fail_on_gates(results)


def _report(result, after_loaded, base_loaded, shape, model, baseline, bundle, sizes, n_threads, latency, memory,
            opset, exporter, static_batch, onnx, accuracy, base_accuracy, quantized=None) -> dict:
    """The before/after report of an export: sizes, MACs, latency (the ONNX file if it was written), accuracy."""
    from dpruner.cli.report import facts_for
    from dpruner.report.compare import build_report

    # with --int8 the float file was temporary: the float column times its own export, the int8 column the file
    written = result is not None and result.written and quantized is None
    # latency runs at every --batches size: where the written file cannot (a static batch), a twin is timed
    settings = {"opset": opset, "exporter": exporter}
    after = facts_for(after_loaded.model, shape, model, bundle, sizes, n_threads, latency,
                      onnx_path=onnx if written else None, memory=memory, export=settings,
                      accuracy=accuracy)
    if written:
        after.onnx_bytes = onnx.stat().st_size
    before = None
    if base_loaded is not None:
        before = facts_for(base_loaded.model, shape, baseline, bundle, sizes, n_threads, latency, memory=memory,
                           export=settings, accuracy=base_accuracy)
    if result is None:  # --torch only: the report's .onnx size and latency come from a temporary export
        return build_report(after, before, threads=n_threads)
    if quantized is None:
        return build_report(after, before, threads=n_threads, onnx={**result.info.to_json(), "written": written},
                            verification=result.verification.to_json())
    from dpruner.report.compare import measure_onnx_file, ratios

    doc = build_report(after, before, threads=n_threads,
                       onnx={**quantized.info.to_json(), "written": quantized.written, "int8": True},
                       verification=result.verification.to_json())
    doc["int8"] = quantized.to_json()
    if quantized.written and quantized.check is not None:
        check = quantized.check
        int8 = measure_onnx_file(onnx, shape, source=f"{onnx} (int8)", params=after.params, macs=after.macs,
                                 batches=sizes, threads=n_threads, latency=latency,
                                 accuracy={check.split: check.int8_accuracy})
        doc["int8"]["model"] = int8.to_json()
        doc["int8"]["ratios_vs_float"] = ratios(after, int8)
        doc["int8"]["ratios_vs_before"] = ratios(before, int8) if before is not None else None
    return doc

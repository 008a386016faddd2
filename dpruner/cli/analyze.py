"""`dpruner analyze`: per-layer structure, params, MACs and filter redundancy of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from dpruner.cli import training as t
from dpruner.cli.errors import handle_errors
from dpruner.cli.options import ArchOpt, InputShapeOpt, JsonOpt, ModelArg, NumClassesOpt, TrustOpt
from dpruner.cli.output import emit_json, human, stderr_console, stdout_console

HELP = "Per-layer params, MACs, output shapes and data-free filter redundancy (L1, geometric median, PCA, BN)."


@handle_errors
def analyze(
    model: ModelArg,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    input_shape: InputShapeOpt = None,
    trust_checkpoint: TrustOpt = False,
    json_output: JsonOpt = False,
    full: Annotated[bool, typer.Option("--full", help="Also compute PCA and geometric-median measures of very large layers (e.g. VGG's 4096x25088 classifier: ~30 s each on 2 cores).")] = False,
    data: t.DataOpt = None,
    batch_size: t.BatchSizeOpt = 128,
    mean: t.MeanOpt = None,
    std: t.StdOpt = None,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="With --data: prune each coupled channel group alone at 10..90% (no fine-tuning) and score top-1 and loss on held-out batches; one row per group. Cached by model hash, so `prune --allocation sensitivity` with the same data options reuses it.")] = False,
    criterion: Annotated[str, typer.Option("--criterion", "--method", help="--sensitivity: the criterion that picks which channels each cut removes (match the prune command's --criterion to share the cache; --method is the old name).")] = "l2",
    sensitivity_batches: t.SensitivityBatchesOpt = 8,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="--sensitivity: also draw the curves into this PNG file (needs matplotlib).")] = None,
    val_from: t.ValFromOpt = "train",
    val_fraction: t.ValFractionOpt = 0.1,
    seed: t.SeedOpt = 0,
) -> None:
    """Analyse MODEL and print a table (or JSON) with one row per Conv/ConvTranspose/Linear/BatchNorm layer."""
    from dpruner.analysis import analyze as run_analysis
    from dpruner.errors import InputError
    from dpruner.io import load_checkpoint
    from dpruner.io.shapes import resolve_input_shape

    err = stderr_console()
    if (sensitivity or plot is not None) and data is None:
        raise InputError("--sensitivity measures accuracy on held-out data; give --data.")
    if plot is not None and not sensitivity:
        raise InputError("--plot draws the sensitivity curves; add --sensitivity.")
    if plot is not None:
        from dpruner.io.atomic import check_not_input, check_output_path

        check_output_path(plot)
        check_not_input(plot, [model])
    if sensitivity:
        from dpruner.criteria import get_criterion

        get_criterion(criterion)  # a typo fails before any work
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    from dpruner.validate import finite_weights

    finite_weights(loaded.model, f"'{model}'")
    shape, origin = resolve_input_shape(input_shape, stored=loaded.input_shape, arch=loaded.arch,
                                        source=str(model), model=loaded.model)
    if origin.endswith(" default"):
        err.print(f"[dim]input shape {','.join(map(str, shape[1:]))} ({origin}; set --input-shape)[/dim]")
    source = {"path": str(model), "format": loaded.source_format, "arch": loaded.arch}
    loader = bundle = None
    if data is not None:  # the widths PCA would keep per group, from the activations on 10 training batches
        from dpruner.train.distributed import DistContext

        bundle = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=0, val_fraction=val_fraction,
                               seed=seed, download=False, ctx=DistContext(), mean=mean, std=std, augment=False,
                               val_from=val_from)
        loader = bundle.train
    result = run_analysis(loaded.model, shape, full=full, source=source, data=loader)
    document = result.to_json()
    scan = None
    if sensitivity:
        import torch

        from dpruner.methods.sensitivity import measure_sensitivity, plot_curves

        def progress(done: int, total: int) -> None:
            if not json_output and (done == total or done % 25 == 0):
                err.print(f"[dim]sensitivity: {done}/{total} pruned copies scored[/dim]")

        scan = measure_sensitivity(
            loaded.model, torch.randn(*shape), bundle.val, criterion=criterion, batches=sensitivity_batches, seed=seed,
            score_data=bundle.train, progress=progress,
            data_key=t.data_key(data, val_from=val_from, val_fraction=val_fraction, seed=seed,
                                batch_size=batch_size, mean=mean, std=std))
        document["sensitivity"] = scan.to_json()
        if plot is not None:
            plot_curves(scan, plot, inputs=[model])
    if json_output:
        emit_json(document)
    else:
        render(result)
        if scan is not None:
            render_sensitivity(scan, plot)


def _norms(red: dict) -> tuple[str, str]:
    stats = red.get("l1") or red.get("gamma")
    if not stats:
        return "", ""
    return (
        f"{stats['min']:.2g}/{stats['median']:.2g}/{stats['max']:.2g}",
        f"{stats['low_share']:.0%}",
    )


def _pca_text(red: dict) -> str:
    pca = red.get("pca")
    if pca and "k90" in pca:
        return f"{pca['k90']}/{pca['k95']}/{pca['k99']}"
    return "skipped (--full)" if "skipped" in red else ""


_SHORT = {"Conv2d": "Conv", "ConvTranspose2d": "ConvT", "BatchNorm2d": "BN", "Linear": "Linear"}


def _type_text(layer) -> str:
    text = _SHORT.get(layer.type, layer.type)
    if layer.kernel:
        text += " " + "x".join(map(str, layer.kernel))
    if layer.groups and layer.groups > 1:
        depthwise = layer.groups == layer.in_channels == layer.out_channels
        text += " dw" if depthwise else f" g{layer.groups}"
    return text


def render(result) -> None:
    """Rich table: one row per layer, an 'other ops' row and a totals row, then a short summary."""
    out = stdout_console()
    table = Table(
        title=f"{result.source.get('path', 'model')}  (input {','.join(map(str, result.input_shape))})",
        caption="norms: L1 of filters, |gamma| for BN; low: share < 1% of the layer's max; ~GM: share of filters "
        "near the geometric median (FPGM); PCA: components for 90/95/99% of the filter variance",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for header in ("#", "layer", "type", "in>out", "params", "MACs", "output", "norms min/med/max", "low", "~GM",
                   "PCA 90/95/99"):
        table.add_column(header, justify="left" if header in ("layer", "type", "output") else "right")
    for i, layer in enumerate(result.layers):
        red = layer.redundancy
        norms, low = _norms(red)
        gm = f"{red['gm']['near_share']:.0%}" if "gm" in red else ""
        table.add_row(
            str(i),
            layer.name,
            _type_text(layer),
            f"{layer.in_channels}>{layer.out_channels}",
            human(layer.params),
            human(layer.macs),
            "x".join(map(str, layer.output_shape[1:])) if layer.output_shape else "not called",
            norms,
            low,
            gm,
            _pca_text(red),
        )
    table.add_section()
    table.add_row("", "(other ops)", "", "", "", human(result.other_macs), *[""] * 5)
    table.add_row("", "[bold]total[/bold]", "", "", f"[bold]{human(result.params)}[/bold]",
                  f"[bold]{human(result.macs)}[/bold]", *[""] * 5)
    out.print(table)
    out.print(f"[bold]{len(result.layers)} layers[/bold], {result.params:,} params, {result.macs:,} MACs "
              f"(fvcore) at input {','.join(map(str, result.input_shape))}.")
    if result.most_redundant:
        items = ", ".join(f"{r['name']} ({r['score']:.2f})" for r in result.most_redundant)
        out.print(f"Most redundant by PCA (1 - k95/min(filters, fan-in)): {items}.")
    if result.groups_error:
        out.print(f"[yellow]Channel coupling unavailable:[/yellow] {result.groups_error}")
    elif result.groups:
        from dpruner.cli.output import opaque_lines

        prunable = [g for g in result.groups if g["prunable"]]
        coupled = [g for g in prunable if len({name for name in g["layers"]}) > 3]
        share = result.prunable_macs_share
        reach = f"; the layers they touch hold {100 * share:.0f}% of the MACs" if share is not None else ""
        out.print(f"Channel groups: {len(prunable)} prunable ({sum(g['channels'] for g in prunable):,} channels), "
                  f"{len(result.groups) - len(prunable)} unprunable{reach}.")
        for line in opaque_lines(result.opaque):
            out.print(line, soft_wrap=True)
        for g in sorted(coupled, key=lambda g: -len(g["layers"]))[:3]:
            out.print(f"  coupled: {len(g['layers'])} layers share {g['channels']} channels "
                      f"({', '.join(g['layers'][:4])}, ...)")
        widths = [g for g in result.groups if g.get("pca_widths")]
        if widths:
            out.print("PCA widths (channels whose principal components explain 90/95/99% of the group's activation "
                      "variance; --allocation pca):")
            for g in widths[:12]:
                w = g["pca_widths"]
                out.print(f"  {', '.join(g['layers'][:3])}{', ...' if len(g['layers']) > 3 else ''}: "
                          f"{w['0.9']}/{w['0.95']}/{w['0.99']} of {g['channels']}")
        for g in [g for g in result.groups if not g["prunable"]][:8]:
            out.print(f"  [yellow]unprunable[/yellow] {', '.join(g['layers'][:3])}: {'; '.join(g['reasons'][:2])}")
    if result.uncounted_ops:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(result.uncounted_ops.items()))
        out.print(f"[dim]Ops fvcore counts no MACs for: {ops}.[/dim]")


def render_sensitivity(scan, plot) -> None:
    """One row per channel group: top-1 on the held-out batches after removing each share of its channels."""
    out = stdout_console()
    table = Table(title=f"Sensitivity per channel group ({scan.criterion}; top-1 on {scan.samples} held-out "
                        f"samples, unpruned {100 * scan.base_accuracy:.1f}%)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("group")
    table.add_column("layers", justify="right")
    table.add_column("channels", justify="right")
    for level in scan.levels:
        table.add_column(f"{100 * level:.0f}%", justify="right")
    for g in scan.groups:
        name = g.layers[0] + (f" +{len(g.layers) - 1}" if len(g.layers) > 1 else "")
        table.add_row(name, str(len(g.layers)), str(g.channels), *[f"{100 * a:.1f}" for a in g.accuracy])
    out.print(table)
    how = "read from the cache" if scan.cached else f"measured in {scan.seconds:.0f} s and cached"
    out.print(f"Sensitivity {how}; `dpruner prune --allocation sensitivity --criterion {scan.criterion}` with the same "
              "data options reuses it." + (f" Curves drawn to {plot}." if plot else ""))

"""`dpruner analyze`: per-layer structure, params, MACs and filter redundancy of a checkpoint."""

from __future__ import annotations

from typing import Annotated

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
) -> None:
    """Analyse MODEL and print a table (or JSON) with one row per Conv/ConvTranspose/Linear/BatchNorm layer."""
    from dpruner.analysis import analyze as run_analysis
    from dpruner.io import load_checkpoint
    from dpruner.io.shapes import resolve_input_shape

    err = stderr_console()
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    from dpruner.validate import finite_weights

    finite_weights(loaded.model, f"'{model}'")
    shape, origin = resolve_input_shape(input_shape, stored=loaded.input_shape, arch=loaded.arch,
                                        source=str(model), model=loaded.model)
    if origin.endswith(" default"):
        err.print(f"[dim]input shape {','.join(map(str, shape[1:]))} ({origin}; set --input-shape)[/dim]")
    source = {"path": str(model), "format": loaded.source_format, "arch": loaded.arch}
    loader = None
    if data is not None:  # the widths PCA would keep per group, from the activations on 10 training batches
        from dpruner.train.distributed import DistContext

        loader = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=0, val_fraction=0.1, seed=0,
                               download=False, ctx=DistContext(), mean=mean, std=std, augment=False).train
    result = run_analysis(loaded.model, shape, full=full, source=source, data=loader)
    if json_output:
        emit_json(result.to_json())
    else:
        render(result)


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

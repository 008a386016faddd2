"""`dpruner evaluate`: top-1 accuracy and loss of a model on a data set's validation and test splits."""

from __future__ import annotations

from typing import Optional

from rich.table import Table

from dpruner.cli import training as t
from dpruner.cli.errors import handle_errors
from dpruner.cli.options import ArchOpt, InputShapeOpt, JsonOpt, ModelArg, NumClassesOpt, TrustOpt
from dpruner.cli.output import emit_json, stdout_console

HELP = "Measure top-1 accuracy on the validation split (held out of train) and the test split of --data."
SCHEMA_VERSION = 1


@handle_errors
@t.releases_process_group
def evaluate(
    model: ModelArg,
    data: t.DataOpt = None,
    val_fraction: t.ValFractionOpt = 0.1,
    val_from: t.ValFromOpt = "train",
    mean: t.MeanOpt = None,
    std: t.StdOpt = None,
    batch_size: t.BatchSizeOpt = 256,
    workers: t.WorkersOpt = 0,
    device: t.DeviceOpt = "auto",
    seed: t.SeedOpt = 0,
    download: t.DownloadOpt = False,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    input_shape: InputShapeOpt = None,
    trust_checkpoint: TrustOpt = False,
    quiet: t.QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Evaluate MODEL on --data."""
    from dpruner.io import load_checkpoint
    from dpruner.io.shapes import parse_input_shape, spatial_dims_of
    from dpruner.train.api import evaluate_splits
    from dpruner.train.distributed import setup

    ctx, dev = setup(device)
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    shape = parse_input_shape(input_shape, spatial_dims=spatial_dims_of(loaded.model)) if input_shape \
        else loaded.input_shape
    bundle = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=workers,
                           val_fraction=val_fraction, val_from=val_from, seed=seed, download=download, ctx=ctx, mean=mean, std=std)
    results = evaluate_splits(loaded.model.to(dev), bundle, dev, ctx=ctx, quiet=quiet)
    if not ctx.is_main:
        return
    document = {"schema": SCHEMA_VERSION, "model": str(model), "data": bundle.name, "device": str(dev),
                **{split: r.to_json() for split, r in results.items()}}
    if json_output:
        emit_json(document)
        return
    out = stdout_console()
    out.print(f"{model} on {bundle.name}")
    table = Table()
    for header in ("split", "top-1", "loss", "samples"):
        table.add_column(header, justify="left" if header == "split" else "right")
    for split, r in results.items():
        table.add_row(split, t.percent(r.accuracy), f"{r.loss:.4f}", str(r.samples))
    out.print(table)

"""`dpruner finetune`: recover accuracy after pruning (single process, or many through torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dpruner.cli import training as t
from dpruner.cli.errors import handle_errors
from dpruner.cli.options import ArchOpt, InputShapeOpt, JsonOpt, ModelArg, NumClassesOpt, TrustOpt
from dpruner.cli.output import emit_json, stderr_console, stdout_console

HELP = "Fine-tune a (pruned) model on --data; optional distillation from the unpruned model; resumable."
SCHEMA_VERSION = 1


@handle_errors
@t.releases_process_group
def finetune(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the fine-tuned dpruner checkpoint (never the input file).")],
    data: t.DataOpt = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs to train (fractions allowed).")] = 10.0,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="The unpruned model to distil from (same --arch as MODEL's architecture). Turns --distill on.")] = None,
    distill: Annotated[Optional[bool], typer.Option("--distill/--no-distill", help="Knowledge distillation from --teacher (default: on when --teacher is given).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUTPUT.resume (saved atomically after every epoch).")] = False,
    lr: t.LrOpt = 0.01,
    weight_decay: t.WeightDecayOpt = 5e-4,
    label_smoothing: t.LabelSmoothingOpt = 0.1,
    warmup_epochs: t.WarmupOpt = 0.0,
    batch_size: t.BatchSizeOpt = 128,
    val_fraction: t.ValFractionOpt = 0.1,
    val_from: t.ValFromOpt = "train",
    mean: t.MeanOpt = None,
    std: t.StdOpt = None,
    augment: t.AugmentOpt = True,
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
    """Fine-tune MODEL on --data and write the result to OUTPUT (with torchrun, rank 0 writes)."""
    import torch

    from dpruner.errors import ArchError, InputError
    from dpruner.io import load_checkpoint, save_checkpoint
    from dpruner.io.atomic import check_not_input
    from dpruner.io.shapes import parse_input_shape, spatial_dims_of
    from dpruner.io.atomic import check_output_path
    from dpruner.train.api import evaluate_splits, finetune as run_finetune, remove_state, state_path_for
    from dpruner.train.distributed import setup

    check_output_path(output)
    check_not_input(output, [model, teacher])
    check_not_input(state_path_for(output), [model, teacher])  # the training state lives beside the output
    if distill and teacher is None:
        raise InputError("--distill needs --teacher (the unpruned model to learn from).")
    config = t.train_config(epochs=epochs, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing,
                            warmup_epochs=warmup_epochs, device=device, seed=seed, quiet=quiet)
    ctx, dev = setup(device)
    torch.manual_seed(seed)
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    if loaded.arch is None:
        raise ArchError(f"'{model}' holds a whole pickled model; pass --arch so the result can be rebuilt.")
    shape = parse_input_shape(input_shape, spatial_dims=spatial_dims_of(loaded.model)) if input_shape \
        else loaded.input_shape
    bundle = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=workers,
                           val_fraction=val_fraction, val_from=val_from, seed=seed, download=download, ctx=ctx, mean=mean, std=std, augment=augment)
    net = loaded.model.to(dev)
    from dpruner.train.evaluate import check_compatible

    data_shape = check_compatible(net, bundle.val, bundle.num_classes, dev)
    if shape is not None and tuple(shape[1:]) != tuple(data_shape):
        raise InputError(f"--input-shape {','.join(map(str, shape[1:]))} does not match the data's images "
                         f"({','.join(map(str, data_shape))}); drop it or pass the data's shape.")
    teacher_model = None
    if teacher is not None and distill is not False:
        teacher_model = load_checkpoint(teacher, arch=arch or loaded.arch, num_classes=loaded.num_classes,
                                        trust_checkpoint=trust_checkpoint).model.to(dev).eval()
    before = evaluate_splits(net, bundle, dev, ctx=ctx)
    state = state_path_for(output)
    result = run_finetune(net, bundle, config, device=dev, ctx=ctx, teacher=teacher_model, state_path=state,
                          resume=resume, keep_state=True)
    after = evaluate_splits(net, bundle, dev, ctx=ctx)
    if not ctx.is_main:
        return
    if shape is None:
        shape = (1, *bundle.input_shape) if bundle.input_shape else None
    meta = {**loaded.meta, "finetune": {"data": bundle.name, "epochs": epochs, "distill": teacher_model is not None,
                                        "config": config.to_json(),
                                        "val_accuracy": after["val"].accuracy,
                                        "test_accuracy": after["test"].accuracy if "test" in after else None}}
    save_checkpoint(output, net.cpu().eval(), inputs=[model], arch=loaded.arch, num_classes=loaded.num_classes,
                    input_shape=shape, plan=loaded.plan, meta=meta)
    remove_state(state, ctx)  # only now: an interrupt before this line resumes instead of losing the run
    document = {"schema": SCHEMA_VERSION, "input": str(model), "output": str(output), "data": bundle.name,
                "device": str(dev), "world_size": ctx.world_size, "distill": teacher_model is not None,
                "resumed_from_step": result.resumed_from_step, "train": result.fit.to_json(),
                "before": {k: v.to_json() for k, v in before.items()},
                "after": {k: v.to_json() for k, v in after.items()}}
    if json_output:
        emit_json(document)
        return
    out = stdout_console()
    out.print(f"{model} -> {output}  ({bundle.name})")
    table = Table()
    for header in ("split", "before", "after"):
        table.add_column(header, justify="left" if header == "split" else "right")
    for split in after:
        table.add_row(split, t.percent(before[split].accuracy), t.percent(after[split].accuracy))
    out.print(table)
    stderr_console().print(f"[dim]{result.fit.epochs:g} epochs, {result.fit.seconds:.0f} s on {dev}"
                           f"{f' x {ctx.world_size} processes' if ctx.enabled else ''}[/dim]")

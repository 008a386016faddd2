"""`dpruner prune`: one-shot structured pruning to a ratio or sparsity, written as a dpruner checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dpruner.cli.errors import handle_errors
from dpruner.cli.options import ArchOpt, InputShapeOpt, JsonOpt, LeafOpt, ModelArg, NumClassesOpt, TrustOpt
from dpruner.cli.output import emit_json, human, stderr_console, stdout_console

HELP = "Remove whole filters/channels to reach a MACs or params ratio (--ratio 2x) or a sparsity; writes a dense smaller model."
SCHEMA_VERSION = 1


@handle_errors
def prune(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pruned dpruner checkpoint (never the input file).")],
    ratio: Annotated[Optional[str], typer.Option("--ratio", help="Target compression, e.g. 2x: the target quantity ends at most 1/2 of the original (within 5%).")] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Alternative to --ratio: the fraction of every channel group to remove, e.g. 0.3.")] = None,
    target: Annotated[str, typer.Option("--target", help="What --ratio counts: macs or params.")] = "macs",
    method: Annotated[str, typer.Option("--method", help="Channel criterion: l1, l2, fpgm, bn, random.")] = "l2",
    allocation: Annotated[str, typer.Option("--allocation", help="uniform (same fraction per group) or global (one threshold over normalised scores).")] = "uniform",
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Protect layers whose name matches this glob (repeatable), e.g. 'features.0*'.")] = None,
    round_to: Annotated[int, typer.Option("--round-to", min=1, help="Keep each group's channel count a multiple of this (e.g. 8).")] = 1,
    max_fraction: Annotated[float, typer.Option("--max-fraction", help="At most this share of any group is removed.")] = 0.9,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random criterion (other criteria are deterministic).")] = 0,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    input_shape: InputShapeOpt = None,
    trust_checkpoint: TrustOpt = False,
    leaf: LeafOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Prune MODEL one-shot (no data, no fine-tuning) and write the result to OUTPUT."""
    import torch

    from dpruner.errors import ArchError, EXIT_TARGET_NOT_MET
    from dpruner.io import load_checkpoint, save_checkpoint
    from dpruner.io.arch import resolve_class
    from dpruner.io.atomic import check_not_input
    from dpruner.io.shapes import resolve_input_shape
    from dpruner.methods.api import parse_ratio, prune as run_prune

    check_not_input(output, [model])
    err = stderr_console()
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    if loaded.arch is None:
        raise ArchError(
            f"'{model}' holds a whole pickled model; dpruner's checkpoint names the architecture, so pass --arch "
            "with a factory that builds it."
        )
    shape, origin = resolve_input_shape(input_shape, stored=loaded.input_shape, arch=loaded.arch)
    if origin == "torchvision default":
        err.print(f"[dim]input shape {','.join(map(str, shape[1:]))} (torchvision default; set --input-shape)[/dim]")
    torch.manual_seed(seed)
    result = run_prune(
        loaded.model, torch.randn(*shape), ratio=parse_ratio(ratio) if ratio is not None else None,
        sparsity=sparsity, target=target, method=method, allocation=allocation, exclude=tuple(exclude or ()),
        round_to=round_to, max_fraction=max_fraction, seed=seed,
        leaf_modules=tuple(resolve_class(item) for item in leaf or ()),
    )
    meta = {**loaded.meta, "pruned": {"method": method, "allocation": allocation, "target": target,
                                      "requested": result.requested, "ratio": result.ratio, "source": str(model)}}
    save_checkpoint(output, result.model, inputs=[model], arch=loaded.arch, num_classes=loaded.num_classes,
                    input_shape=shape, plan=[*(loaded.plan or []), result.plan], meta=meta)
    document = {"schema": SCHEMA_VERSION, "input": str(model), "output": str(output), "arch": loaded.arch,
                "input_shape": list(shape), **result.to_json()}
    if json_output:
        emit_json(document)
    else:
        render(document)
    if not result.target_met:
        err.print(f"error: the requested ratio was not reached (achieved {result.ratio[target]:.2f}x {target}); "
                  f"the model was written to '{output}' anyway.")
        raise typer.Exit(EXIT_TARGET_NOT_MET)


def render(doc: dict) -> None:
    out = stdout_console()
    table = Table(title=f"{doc['input']} -> {doc['output']}  ({doc['method']}, {doc['allocation']})")
    for header in ("", "before", "after", "ratio"):
        table.add_column(header, justify="right" if header else "left")
    for key in ("params", "macs"):
        table.add_row(key.upper() if key == "macs" else key, human(doc["before"][key]), human(doc["after"][key]),
                      f"{doc['ratio'][key]:.2f}x")
    out.print(table)
    pruned = [g for g in doc["groups"] if g["kept"] < g["channels"]]
    out.print(f"{len(pruned)} of {len(doc['groups'])} prunable channel groups pruned.")
    if doc["unprunable"]:
        out.print(f"[yellow]{len(doc['unprunable'])} channel groups could not be pruned[/yellow], e.g.:")
        for item in doc["unprunable"][:5]:
            out.print(f"  {', '.join(item['layers'][:3])}: {item['reasons'][0] if item['reasons'] else ''}")

"""`dpruner prune`: one-shot structured pruning to a ratio or sparsity, written as a dpruner checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dpruner.cli import training as t
from dpruner.cli.errors import handle_errors
from dpruner.cli.options import ArchOpt, InputShapeOpt, JsonOpt, LeafOpt, ModelArg, NumClassesOpt, TrustOpt
from dpruner.cli.output import emit_json, human, print_error, stderr_console, stdout_console

HELP = ("Remove whole filters/channels to reach a MACs or params ratio (--ratio 2x), a sparsity, or the smallest model "
        "within an accuracy tolerance (--tolerance 1% --data ...); writes a dense smaller model.")
SCHEMA_VERSION = 2  # 2: "method" names the algorithm, "criterion" the score (1: "method" was the criterion)


@handle_errors
@t.releases_process_group
def prune(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pruned dpruner checkpoint (never the input file).")],
    ratio: Annotated[Optional[str], typer.Option("--ratio", help="Target compression, e.g. 2x: the target quantity ends at most 1/2 of the original (within 5%).")] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Alternative to --ratio: the fraction of every channel group to remove, e.g. 0.3.")] = None,
    tolerance: Annotated[Optional[str], typer.Option("--tolerance", help="Alternative to --ratio: at most this many points of top-1 accuracy lost on the validation split, e.g. 1% or 0.01 (needs --data; Play-and-Prune controller).")] = None,
    data: t.DataOpt = None,
    budget_epochs: Annotated[float, typer.Option("--budget-epochs", help="With --data: all fine-tuning epochs (steps, recovery and the final fine-tune; after --ratio: the fine-tune).")] = 10.0,
    step_epochs: Annotated[float, typer.Option("--step-epochs", help="--tolerance: fine-tuning epochs per pruning step (fractions allowed).")] = 1.0,
    max_ratio: Annotated[Optional[str], typer.Option("--max-ratio", help="--tolerance: never compress MACs beyond this, e.g. 4x.")] = None,
    distill: Annotated[bool, typer.Option("--distill/--no-distill", help="With --data: distil from the unpruned model while fine-tuning.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="--tolerance, --method gate and --method spp: continue an interrupted run from OUTPUT.resume (saved atomically after every step).")] = False,
    penalty: Annotated[float, typer.Option("--penalty", help="--tolerance: strength of the L1 push on the channels about to be removed before they go (relative to their magnitude; 0: off).")] = 5.0,
    score_momentum: Annotated[float, typer.Option("--score-momentum", help="--tolerance with a data criterion (taylor, activation): each step's scores are averaged with the previous steps' as m * old + (1 - m) * new, so one set of batches does not decide alone (0: off).")] = 0.5,
    spp_a: Annotated[Optional[float], typer.Option("--spp-a", help="--method spp: the largest step of a channel's pruning probability per rank update (A in Wang et al. 2018). Default: the paper's 0.05, raised to 6/updates when the pruning phase holds fewer than 120 rank updates.")] = None,
    spp_u: Annotated[float, typer.Option("--spp-u", help="--method spp: the increment at the curve's knee, as a share of A (u; below 0.5).")] = 0.25,
    spp_interval: Annotated[Optional[int], typer.Option("--spp-interval", help="--method spp: optimizer steps between rank updates of the probabilities (t; the paper's ImageNet runs used 180). Default: the probabilistic phase's steps x A / 6, so it holds 6/A updates.")] = None,
    spp_fraction: Annotated[float, typer.Option("--spp-fraction", help="--method spp: at most this share of --budget-epochs trains with probabilistic masks; the rest retrains the pruned model.")] = 0.5,
    soft: Annotated[bool, typer.Option("--soft", help="With --ratio and --data: soft pruning while fine-tuning (FPGM's schedule): every --soft-every epochs the lowest channels are zeroed but may regrow; the last choice is removed at the end.")] = False,
    soft_every: Annotated[float, typer.Option("--soft-every", help="--soft: epochs between re-choices of the zeroed channels.")] = 1.0,
    granularity: Annotated[str, typer.Option("--granularity", help="--method coarse: feature-map (whole channels to --ratio: a dense, smaller model) or kernel (individual k x k kernels, --sparsity of every conv layer: zeros in the same shapes; input channels nobody reads any more are removed).")] = "feature-map",
    candidates: Annotated[int, typer.Option("--candidates", help="--method coarse: random masks tried per group; the least adversarial (lowest error on --eval-batches validation batches) is kept.")] = 20,
    criterion_candidate: Annotated[bool, typer.Option("--criterion-candidate/--random-candidates-only", help="--method coarse: the criterion's own choice (lowest-scored channels) competes as one of the --candidates masks; off: all random, as in the paper.")] = True,
    bn_statistics: Annotated[str, typer.Option("--bn-statistics", help="--method coarse: judge candidates with BatchNorm on each evaluation batch's own statistics (batch: as after the recalibration that follows removal) or on the stale running ones (running).")] = "batch",
    eval_batches: Annotated[int, typer.Option("--eval-batches", help="--method coarse: validation batches the candidate masks are judged on (decoded once, kept in memory).")] = 8,
    gate_sparsity: Annotated[Optional[float], typer.Option("--gate-sparsity", help="--method gate: weight of the sparsity term (see --gate-pull; default 20 for target, 2 for zero).")] = None,
    gate_binary: Annotated[float, typer.Option("--gate-binary", help="--method gate: weight of each group's mean s(1-s) in the loss (pushes scores to 0 or 1).")] = 0.1,
    gate_threshold: Annotated[float, typer.Option("--gate-threshold", help="--method gate: channels whose interval score (as --gate-rank ranks them) is below this are removed.")] = 0.1,
    gate_every: Annotated[Optional[float], typer.Option("--gate-every", help="--method gate: epochs between removals (fractions allowed; default: a tenth of --budget-epochs, so the gating phase of --gate-final 0.6 holds three or four removals).")] = None,
    gate_schedule: Annotated[str, typer.Option("--gate-schedule", help="--method gate with --ratio: progressive (interval i of n removes at least up to ratio^(i/n), so the network recovers between removals) or last (only the last interval forces the ratio; earlier ones remove what the threshold says).")] = "progressive",
    gate_final: Annotated[Optional[float], typer.Option("--gate-final", help="--method gate: share of --budget-epochs kept for the final fine-tune without scorers (the gating phase gets the rest); default 0.6 with --ratio, 0.3 with only --tolerance. ResNet-56 at 2x: 0.6 gave 78.6% (1 epoch) and 82.4% (3 epochs) where 0.2 gave 76.9% and 75.3%; with --tolerance 1% and 3 epochs, 0.3 reached 1.34x MACs where 0.6 reached 1.17x, at the same accuracy.")] = None,
    gate_pull: Annotated[str, typer.Option("--gate-pull", help="--method gate: the sparsity term. target: each group's mean score is pulled to the share of channels the goal keeps (with --ratio the plan at the ratio left, with only --tolerance the interval's step), so the scores cannot all fall together; zero: every score is pulled toward 0 (the paper's form; on ResNet-56 with longer intervals the scores of whole groups fell together and every removal lost accuracy).")] = "target",
    gate_rate: Annotated[float, typer.Option("--gate-rate", help="--method gate with --tolerance and no --ratio: share of the MACs (or --target) the first removal takes, 0.01-0.3; later ones grow with the accuracy headroom and shrink after a removal that fell below the tolerance (Play-and-Prune's controller, at most 0.3; the run stops below 0.01).")] = 0.1,
    gate_rank: Annotated[str, typer.Option("--gate-rank", help="--method gate: how an interval's scores rank channels: logit (sigmoid of the mean logit; unbiased by how much a score fluctuates between batches) or score (the mean score).")] = "logit",
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
    download: t.DownloadOpt = False,
    quiet: t.QuietOpt = False,
    target: Annotated[str, typer.Option("--target", help="What --ratio counts: macs, params, or latency (measured in --runtime on this machine at --batch with --threads: a per-layer latency table plans the cut, the pruned model is timed end to end to confirm it; docs/pruning.md).")] = "macs",
    max_latency: Annotated[Optional[str], typer.Option("--max-latency", help="With --tolerance: stop pruning once the latency measured in --runtime (at --batch, --threads) is at most this share of the original's, e.g. 0.6x; a per-layer latency table caps each step so it does not cut further than needed.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, max=4096, help="--target latency: the batch size latency is measured at.")] = 1,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, max=1024, help="--target latency: intra-op threads of the runtime (default: all cores this process may use).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Pruning method (the algorithm; `dpruner methods` lists them): one-shot (default; fine-tuned after the cut when --data is given), tolerance (default with --tolerance: Play-and-Prune), pca-gm (with --data: PCA widths + geometric-median survivors, seed 001), spp (with --data and --ratio: structured probabilistic pruning while fine-tuning, seed 004), gate (with --data and --ratio and/or --tolerance: D-Pruner's embedded scorer networks, seed 000), coarse (with --data and --ratio: least-adversarial random feature-map masks, seed 002). A criterion name here (--method l1) still works and means --criterion l1.")] = None,
    criterion: Annotated[Optional[str], typer.Option("--criterion", help="What ranks channels: l1, l2, fpgm, bn, random; with --data also taylor (Molchanov et al. 2019) and activation, scored on 10 training batches (default l2; l1 with --tolerance, as in Play-and-Prune).")] = None,
    allocation: Annotated[str, typer.Option("--allocation", help="uniform (same fraction per group), global (one threshold over normalised scores), pca (with --data: each group keeps the width whose principal components explain the needed share of its activations' variance; seed 001), or sensitivity (with --data: each group's cut chosen from its measured sensitivity curve for the least predicted loss at the target; see analyze --sensitivity).")] = "uniform",
    sensitivity_batches: t.SensitivityBatchesOpt = 8,
    pca_energy: Annotated[Optional[float], typer.Option("--pca-energy", help="With --allocation pca or --method pca-gm instead of --ratio: the share of each group's activation variance its kept width must explain, e.g. 0.99.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Protect layers whose name matches this glob (repeatable), e.g. 'features.0*'.")] = None,
    round_to: Annotated[Optional[str], typer.Option("--round-to", help="Keep each group's channel count a multiple of this (e.g. 8), or auto: the multiple --runtime computes in on this machine (16 for ONNX Runtime on AVX-512, 8 on AVX2; docs/pruning.md). Default 1, and auto with --target latency.")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="Where the pruned model will run, for --round-to auto: onnxruntime or torch (on this CPU) or cuda (an NVIDIA GPU).")] = "onnxruntime",
    precision: Annotated[str, typer.Option("--precision", help="The precision it will run at, for --round-to auto: float32, float16, bfloat16 (cuda) or int8.")] = "float32",
    max_fraction: Annotated[float, typer.Option("--max-fraction", help="At most this share of any group is removed.")] = 0.9,
    seed: t.SeedOpt = 0,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    input_shape: InputShapeOpt = None,
    trust_checkpoint: TrustOpt = False,
    leaf: LeafOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Prune MODEL and write the result to OUTPUT with a pruning method (one-shot by default; with --data the
    result is fine-tuned; --tolerance runs the Play-and-Prune controller; rank 0 writes)."""
    import torch

    from dpruner.errors import EXIT_TARGET_NOT_MET, InputError
    from dpruner.io import load_checkpoint
    from dpruner.io.dpruner_format import save_pruned
    from dpruner.io.arch import resolve_class
    from dpruner.io.atomic import check_not_input, check_output_path
    from dpruner.io.shapes import resolve_input_shape
    from dpruner.methods.api import parse_ratio
    from dpruner.methods.run import OneShotConfig, resolve, run
    from dpruner.train.state import state_path_for

    check_output_path(output)
    check_not_input(output, [model])
    check_not_input(state_path_for(output), [model])  # a resumable run's state lives beside the output
    if tolerance is not None and method != "gate" and (ratio is not None or sparsity is not None or
                                                      pca_energy is not None):
        raise InputError("Give one of --ratio, --sparsity and --tolerance.")
    if tolerance is not None and data is None:
        raise InputError("--tolerance needs --data: accuracy is measured on its validation split.")
    if resume and tolerance is None and method not in ("gate", "spp"):
        raise InputError("--resume applies to --tolerance, --method gate and --method spp runs; a one-shot prune "
                         "has nothing to resume.")
    # every option is checked before the model is loaded, so a typo costs nothing and nothing is written
    err = stderr_console()
    from dpruner.runtime.widths import auto_round_to, parse_round_to

    round_to, rounding = parse_round_to(round_to if round_to is not None else
                                        "auto" if target == "latency" or max_latency else 1), None
    if round_to == "auto":
        rounding = auto_round_to(runtime=runtime, precision=precision)
        round_to = rounding.multiple
        if not quiet:
            err.print(f"[dim]--round-to auto: {round_to} ({rounding.reason})[/dim]")
    method, criterion = resolve(method, criterion, tolerance=tolerance is not None)
    latency_spec = None
    if max_latency is not None:
        from dpruner.runtime.latency import LatencySpec

        if tolerance is None or method != "tolerance":
            raise InputError("--max-latency caps a --tolerance run; with --ratio use --target latency.")
        if runtime not in ("onnxruntime", "torch"):
            raise InputError(f"--max-latency measures on this machine: --runtime onnxruntime or torch, not "
                             f"'{runtime}'.")
        cap = max_latency.strip().lower().removesuffix("x").strip()
        try:
            max_latency = float(cap)
        except ValueError:
            raise InputError(f"--max-latency must look like 0.6x (a share of the original latency), got "
                             f"'{max_latency}'.") from None
        latency_spec = LatencySpec(runtime=runtime, batch=batch, threads=threads)
    if target == "latency":
        from dpruner.runtime.latency import LatencySpec
        from dpruner.runtime.widths import RUNTIMES

        if method not in ("one-shot", "pca-gm") or soft or tolerance is not None:
            raise InputError("--target latency works with one-shot pruning to a --ratio (--method one-shot or "
                             "pca-gm, no --soft, no --tolerance).")
        if runtime not in ("onnxruntime", "torch"):
            raise InputError(f"--target latency measures on this machine: --runtime onnxruntime or torch, not "
                             f"'{runtime}' ({', '.join(RUNTIMES)} are known to --round-to auto).")
        latency_spec = LatencySpec(runtime=runtime, batch=batch, threads=threads)
    if soft and method != "one-shot":
        raise InputError(f"--soft is a fine-tuning schedule of one-shot pruning (--ratio with --data), not of "
                         f"--method {method}.")
    train = None
    if method == "gate":
        from dpruner.methods.gate import GateConfig
        from dpruner.methods.tolerance import parse_tolerance

        if data is None:
            raise InputError("--method gate learns which channels go while fine-tuning: give --data.")
        if sparsity is not None or pca_energy is not None:
            raise InputError("--method gate prunes to a --ratio and/or a --tolerance.")
        config = GateConfig(ratio=parse_ratio(ratio) if ratio is not None else None,
                            tolerance=parse_tolerance(tolerance) if tolerance is not None else None, target=target,
                            exclude=tuple(exclude or ()), max_fraction=max_fraction, seed=seed,
                            sparsity_weight=gate_sparsity, binary_weight=gate_binary, threshold=gate_threshold,
                            prune_every=gate_every, schedule=gate_schedule, rank=gate_rank, pull=gate_pull,
                            final_fraction=gate_final, step_rate=gate_rate)
    elif tolerance is not None:
        from dpruner.methods.tolerance import ToleranceConfig, parse_tolerance

        config = ToleranceConfig(tolerance=parse_tolerance(tolerance), budget_epochs=budget_epochs,
                                 step_epochs=step_epochs, max_ratio=parse_ratio(max_ratio) if max_ratio else None,
                                 penalty=penalty, criterion=criterion, score_momentum=score_momentum,
                                 max_fraction=max_fraction, round_to=round_to, exclude=tuple(exclude or ()),
                                 max_latency=max_latency, latency=latency_spec)
    elif method == "coarse":
        from dpruner.methods.coarse import CoarseConfig

        if data is None:
            raise InputError("--method coarse judges random masks on held-out data: give --data.")
        config = CoarseConfig(ratio=parse_ratio(ratio) if ratio is not None else None, granularity=granularity,
                              sparsity=sparsity, target=target, criterion=criterion, allocation=allocation,
                              exclude=tuple(exclude or ()), round_to=round_to, max_fraction=max_fraction, seed=seed,
                              candidates=candidates, eval_batches=eval_batches,
                              criterion_candidate=criterion_candidate, bn_statistics=bn_statistics)
    elif method == "spp":
        from dpruner.methods.spp import SPPConfig

        if ratio is None or data is None:
            raise InputError("--method spp learns which channels go while fine-tuning: give --ratio and --data.")
        config = SPPConfig(ratio=parse_ratio(ratio), target=target, criterion=criterion, allocation=allocation,
                           exclude=tuple(exclude or ()), round_to=round_to, max_fraction=max_fraction, seed=seed,
                           A=spp_a, u=spp_u, interval=spp_interval, prune_fraction=spp_fraction)
    else:
        config = OneShotConfig(ratio=parse_ratio(ratio) if ratio is not None else None, sparsity=sparsity,
                               pca_energy=pca_energy, target=target, criterion=criterion, allocation=allocation,
                               exclude=tuple(exclude or ()), round_to=round_to, max_fraction=max_fraction, seed=seed,
                               sensitivity_batches=sensitivity_batches, soft=soft, soft_every=soft_every,
                               latency=latency_spec,
                               data_key=t.data_key(data, val_from=val_from, val_fraction=val_fraction, seed=seed,
                                                   batch_size=batch_size, mean=mean, std=std) if data else "")
    if data is not None:
        from dpruner import validate

        validate.epochs(budget_epochs, "--budget-epochs")
        train = t.train_config(epochs=budget_epochs, lr=lr, weight_decay=weight_decay,
                               label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, device=device, seed=seed,
                               quiet=quiet)
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    from dpruner.validate import finite_weights

    finite_weights(loaded.model, f"'{model}'")
    shape, origin = resolve_input_shape(input_shape, stored=loaded.input_shape, arch=loaded.arch,
                                        source=str(model), model=loaded.model)
    if origin.endswith(" default") and data is None:
        err.print(f"[dim]input shape {','.join(map(str, shape[1:]))} ({origin}; set --input-shape)[/dim]")
    leaves = tuple(resolve_class(item) for item in leaf or ())
    torch.manual_seed(seed)
    document = {"schema": SCHEMA_VERSION, "input": str(model), "output": str(output), "arch": loaded.arch,
                "input_shape": list(shape)}
    example = torch.randn(*shape)
    if data is None:
        result = run(method, loaded.model, example, config, leaf_modules=leaves)
    else:
        from dpruner.train.distributed import setup

        ctx, dev = setup(device)
        bundle = t.load_bundle(data, input_shape=shape, batch_size=batch_size, workers=workers,
                               val_fraction=val_fraction, val_from=val_from, seed=seed, download=download, ctx=ctx,
                               mean=mean, std=std, augment=augment)
        log = (lambda message: err.print(f"[dim]{message}[/dim]", soft_wrap=True)) if ctx.is_main and not quiet \
            else (lambda m: None)
        state_hooks = _resume_hooks(model, output, ctx, resume) if method in ("tolerance", "gate", "spp") else {}
        document.update({"data": bundle.name, "device": str(dev), "world_size": ctx.world_size})
        result = run(method, loaded.model, example, config, data=bundle, train=train, device=dev, ctx=ctx,
                     distill=distill, leaf_modules=leaves, log=log, **state_hooks)
        if not ctx.is_main:
            return
    document.update(result.to_json())
    if rounding is not None:
        document["round_to"] = {**rounding.to_json(), "runtime": runtime, "precision": precision}
    # without data the pruned model is written even when the ratio was missed (exit 4 says so); with data a run
    # that missed its goal (a tolerance not met even by the first step) writes nothing
    write = result.target_met or data is None
    if write:
        summary = {"method": result.method, "criterion": result.criterion, "requested": result.requested,
                   "ratio": result.ratio, "source": str(model)}
        if data is None:
            summary.update({"allocation": allocation, "target": target})
        else:
            summary.update({"data": bundle.name, "val_accuracy": result.after.get("accuracy"),
                            "test_accuracy": result.after.get("test_accuracy")})
        save_pruned(output, result.model, loaded, inputs=[model], input_shape=shape,
                    plan=[*(loaded.plan or []), *result.plans], meta={**loaded.meta, "pruned": summary})
    else:
        document["output"] = None
    if method in ("tolerance", "gate", "spp"):
        from dpruner.train.state import remove_state

        remove_state(state_path_for(output), ctx)  # only now: an interrupt before this line resumes the run
    if json_output:
        emit_json(document)
    else:
        render(document)
    if not result.target_met:
        if result.method == "gate":
            print_error("the gates did not reach the goal (--ratio within --tolerance) in --budget-epochs, so nothing "
                        "was written; allow more epochs, a larger --tolerance or a stronger --gate-sparsity.")
        elif tolerance is not None:
            print_error("even the first pruning step lost more accuracy than --tolerance allows, so nothing was "
                        "written; allow a larger --tolerance or more fine-tuning per step (--step-epochs).")
        elif data is None:
            achieved = result.ratio[target]
            requested = parse_ratio(ratio) if ratio is not None else None
            written = f"the model was written to '{output}' anyway."
            if requested is not None and achieved > requested:  # below the 5% window: the widths could not land nearer
                print_error(f"the requested ratio was overshot (achieved {achieved:.2f}x {target} for {requested:g}x: "
                            f"the channel multiple leaves no width nearer; try a smaller --round-to); {written}")
            else:
                of = f" of {requested:g}x" if requested is not None else ""
                print_error(f"the requested ratio was not reached (achieved {achieved:.2f}x {target}{of}); {written}")
        else:
            print_error("the requested ratio was not reached; the model was not written.")
        raise typer.Exit(EXIT_TARGET_NOT_MET)


def _resume_hooks(model: Path, output: Path, ctx, resume: bool) -> dict:
    """run()'s resume/on_checkpoint hooks for a resumable run (--tolerance, gate, spp): its state is saved
    atomically beside OUTPUT after every step (rank 0), and --resume reads it back."""
    from dpruner.io.atomic import atomic_torch_save
    from dpruner.train.state import read_resume, state_path_for

    state_path = state_path_for(output)
    state = read_resume(state_path) if resume else None

    def save_state(payload: dict) -> None:
        if ctx.is_main:
            atomic_torch_save(payload, state_path, inputs=[model])

    return {"resume": state, "on_checkpoint": save_state}


def render(doc: dict) -> None:
    out = stdout_console()
    how = ", ".join(x for x in (doc["method"], doc["criterion"], doc.get("allocation")) if x)
    out.print(f"{doc['input']} -> {doc['output']}  ({how})")
    table = Table()
    for header in ("", "before", "after", "ratio"):
        table.add_column(header, justify="right" if header else "left")
    for key in ("params", "macs"):
        table.add_row(key.upper() if key == "macs" else key, human(doc["before"][key]), human(doc["after"][key]),
                      f"{doc['ratio'][key]:.2f}x")
    latency = doc.get("latency")
    if not latency and "latency" in doc["ratio"]:  # --max-latency: measured before and after, no table details
        table.add_row("latency", f"{doc['before']['latency']:.2f} ms", f"{doc['after']['latency']:.2f} ms",
                      f"{doc['ratio']['latency']:.2f}x")
    if latency and "latency" in doc["ratio"]:
        table.add_row(f"latency ({latency['runtime']}, batch {latency['batch']})", f"{latency['before_ms']:.2f} ms",
                      f"{latency['after_ms']:.2f} ms (predicted {latency['predicted_ms']:.2f})",
                      f"{doc['ratio']['latency']:.2f}x")
    for key, label in (("accuracy", "val top-1"), ("test_accuracy", "test top-1")):
        if key in doc["before"] and key in doc["after"]:
            delta = 100 * (doc["after"][key] - doc["before"][key])
            table.add_row(label, t.percent(doc["before"][key]), t.percent(doc["after"][key]), f"{delta:+.2f} pt")
    out.print(table)
    if "data" in doc:
        if doc["history"]:
            # gate: a removal is kept when "pruned", or "recovered" after one interval below the tolerance
            accepted = len([h for h in doc["history"] if (h.get("accepted") and h["action"] != "final")
                            or h.get("action") in ("pruned", "recovered")])
            out.print(f"{accepted} accepted steps, {doc['epochs_used']:.2f} fine-tuning epochs on {doc['data']}.")
        else:
            out.print(f"Pruned one-shot, then fine-tuned {doc['epochs_used']:.2f} epochs on {doc['data']}.")
    if "groups" not in doc:
        return
    pruned = [g for g in doc["groups"] if g["kept"] < g["channels"]]
    share = doc.get("prunable_macs_share")
    reach = f"; the layers they touch hold {100 * share:.0f}% of the MACs" if share is not None else ""
    out.print(f"{len(pruned)} of {len(doc['groups'])} prunable channel groups pruned{reach}.")
    from dpruner.cli.output import opaque_lines

    for line in opaque_lines(doc.get("opaque", [])):
        out.print(line, soft_wrap=True)
    if doc["unprunable"]:
        out.print(f"[yellow]{len(doc['unprunable'])} channel groups could not be pruned[/yellow], e.g.:")
        for item in doc["unprunable"][:5]:
            out.print(f"  {', '.join(item['layers'][:3])}: {item['reasons'][0] if item['reasons'] else ''}")

"""Coverage beyond torchvision classification: dpruner vs Torch-Pruning 1.6.1, each pruning to 2x MACs.

    bash bench/setup.sh
    .venv-bench/bin/python bench/coverage.py                 # run every missing (model, tool) row, then write the doc
    .venv-bench/bin/python bench/coverage.py --models timm:resnet18 smp:Unet:resnet34
    .venv-bench/bin/python bench/coverage.py --report-only   # regenerate docs/coverage.md from the results

Models: timm classifiers, torchvision detection / segmentation / video / optical flow, segmentation-models-pytorch
and Ultralytics YOLO, all built with random weights (nothing is downloaded). Each (model, tool) runs in its own
process with a wall-time cap and an address-space cap (RLIMIT_AS); the child writes its state after every stage,
so a timeout still tells how far it got. Results are appended to bench/results/coverage/results.jsonl, one JSON
object per (model, tool); rows already there are skipped, so an interrupted run is continued by running it again.

Per (model, tool) it records: result (ok / failed: reason / timeout / memory / not applicable), the MACs ratio
measured by ONE counter for both tools (dpruner.count_macs, i.e. fvcore, on the same example input; where fvcore
cannot count a model, a forward-hook counter of conv/linear MACs is used for both tools and marked), the share of
MACs in layers the tool changed, dpruner's prunable share (MACs of layers in prunable channel groups / total, from
dpruner.graph.summary.analyze_groups), a forward + output-structure check (same dict keys, sequence lengths and tensor
shapes as the original on the example input; for torchvision detection the number of detections depends on the
weights, so the first dimension of those tensors is not compared), ONNX export + verification of dpruner's result
(dpruner.export.api.export_model) and the wall time.

How each tool reaches 2x MACs: dpruner.prune(model, example, ratio=2.0, method="l2"); Torch-Pruning: MetaPruner
with MagnitudeImportance(p=2) and the final classifier / prediction heads in ignored_layers, searched over the global
channel pruning ratio on fresh copies (as bench/peer_torch_pruning.py does, with a secant step and an early stop)
until the MACs are within 5% of half. A tool "prunes" a model when the structure check passes and the MACs ratio is
at least 1.5x.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "coverage"
RESULTS_FILE = RESULTS / "results.jsonl"
DOC = ROOT / "docs" / "coverage.md"
GOAL = 2.0
PRUNES_AT = 1.5
TOLERANCE = 0.05

TIMM = [
    # the list of the coverage issue
    "efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "densenet121", "repvgg_a0", "mobileone_s0",
    "tinynet_a", "mixnet_s", "inception_v3", "ese_vovnet19b_dw", "resnetv2_50", "cspdarknet53", "rexnet_100",
    "convnext_atto", "efficientformer_l1", "res2net50_14w_8s", "mobilevit_xxs", "nfnet_l0", "resnet50", "resnet18",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "ghostnet_100",
    "hrnet_w18_small", "dla34", "dpn68", "fbnetc_100", "mnasnet_100", "lcnet_050", "levit_128s", "poolformer_s12",
    "coat_tiny",
    # more families
    "mobilenetv4_conv_small", "efficientvit_b0", "fastvit_t8", "edgenext_xx_small", "convnextv2_atto",
    "regnetx_002", "seresnext26d_32x4d", "selecsls42b", "hgnetv2_b0", "repghostnet_050", "pvt_v2_b0", "resnest14d",
    "tiny_vit_5m_224", "mambaout_femto", "starnet_s1", "efficientvit_m0", "xcit_nano_12_p16_224", "ghostnetv2_100",
]
TV_DET = ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
          "fcos_resnet50_fpn", "keypointrcnn_resnet50_fpn"]
TV_SEG = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
TV_VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18"]
SMP = [("Unet", "resnet34"), ("FPN", "resnet34"), ("DeepLabV3Plus", "resnet34"), ("Unet", "mobilenet_v2"),
       ("PSPNet", "resnet34")]
YOLO = ["yolov8n.yaml", "yolo11n.yaml"]


def all_models() -> list[str]:
    return ([f"timm:{n}" for n in TIMM] + [f"tv-det:{n}" for n in TV_DET] + [f"tv-seg:{n}" for n in TV_SEG]
            + [f"tv-video:{n}" for n in TV_VIDEO] + ["tv-flow:raft_small"]
            + [f"smp:{a}:{e}" for a, e in SMP] + [f"yolo:{n}" for n in YOLO])


FAMILIES = {"timm": "timm classification", "tv-det": "torchvision detection", "tv-seg": "torchvision segmentation",
            "tv-video": "torchvision video", "tv-flow": "torchvision optical flow",
            "smp": "segmentation-models-pytorch", "yolo": "Ultralytics YOLO"}


# ----------------------------------------------------------------------------------------------------- models
def build(spec: str):
    """(model in eval mode, example input, names of the layers Torch-Pruning must leave alone, variable_dim0).

    The example is what the model is called with: a tensor, a list of one image (torchvision detection) or a tuple
    of two images (RAFT)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    kind, _, name = spec.partition(":")
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        heads = model.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        ids = {id(m) for h in heads if isinstance(h, nn.Module) for m in h.modules()}
        ignored = [n for n, m in model.named_modules()
                   if id(m) in ids and isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
        return model.eval(), torch.randn(1, *size), ignored, False
    if kind == "tv-det":
        import torchvision

        kwargs = {} if "320" in name else {"min_size": 320, "max_size": 320}  # keep the 320x320 image at 320
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)
        pattern = re.compile(r"(cls_logits|bbox_reg|bbox_pred|cls_score|bbox_ctrness|kps_score_lowres|"
                             r"classification_head\.module_list\.\d+\.1|regression_head\.module_list\.\d+\.1)$")
        ignored = [n for n, m in model.named_modules()
                   if pattern.search(n) and isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
        return model.eval(), [torch.rand(3, 320, 320)], ignored, True
    if kind == "tv-seg":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False)
        classes = 21
        ignored = [n for n, m in model.named_modules()
                   if n.startswith("classifier") and isinstance(m, nn.Conv2d) and m.out_channels == classes]
        return model.eval(), torch.randn(1, 3, 224, 224), ignored, False
    if kind == "tv-video":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        return model.eval(), torch.randn(1, 3, 8, 112, 112), ["fc"], False
    if kind == "tv-flow":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        ignored = [n for n, m in model.named_modules() if n.endswith("flow_head.conv2") or n.endswith("mask.2")]
        return model.eval(), (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)), ignored, False
    if kind == "smp":
        import segmentation_models_pytorch as smp

        arch, _, encoder = name.partition(":")
        model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)
        ignored = [n for n, m in model.named_modules()
                   if n.startswith(("segmentation_head", "classification_head")) and isinstance(m, (nn.Conv2d, nn.Linear))]
        return model.eval(), torch.randn(1, 3, 256, 256), ignored, False
    if kind == "yolo":
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(name, verbose=False)
        head = model.model[-1]
        ignored = []
        for prefix in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
            for i, branch in enumerate(getattr(head, prefix, None) or []):
                last = [n for n, m in branch.named_modules() if isinstance(m, nn.Conv2d)][-1]
                ignored.append(f"model.{len(model.model) - 1}.{prefix}.{i}.{last}")
        ignored += [f"model.{len(model.model) - 1}.dfl.conv"] if hasattr(head, "dfl") and \
            isinstance(getattr(head.dfl, "conv", None), nn.Conv2d) else []
        return model.eval(), torch.randn(1, 3, 320, 320), ignored, False
    raise ValueError(f"unknown model spec {spec}")


# ----------------------------------------------------------------------------------------------------- measuring
def call(model, example):
    import torch

    with torch.no_grad():
        return model(*example) if isinstance(example, tuple) else model(example)


def signature(value, variable_dim0: bool):
    """Output structure with tensors replaced by shapes (dim 0 dropped where it depends on the weights)."""
    import torch

    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        return shape[1:] if variable_dim0 and value.dim() > 0 else shape
    if isinstance(value, dict):
        return {str(k): signature(v, variable_dim0) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__ if not hasattr(value, "_fields") else "tuple"] + \
            [signature(v, variable_dim0) for v in value]
    return type(value).__name__


def describe_difference(a, b, path="out") -> str:
    """First place where two signatures differ, in one short line."""
    if type(a) is not type(b):
        return f"{path}: {a!s:.60} vs {b!s:.60}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            if a[k] != b[k]:
                return describe_difference(a[k], b[k], f"{path}[{k!r}]")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {a[0]} of length {len(a) - 1} vs {len(b) - 1}"
        for i, (x, y) in enumerate(zip(a[1:], b[1:])):
            if x != y:
                return describe_difference(x, y, f"{path}[{i}]")
    return f"{path}: shape {a} vs {b}"


def hook_macs(model, example) -> tuple[int, dict]:
    """Fallback counter: MACs of conv and linear layers from forward hooks (used for both tools when fvcore fails)."""
    import torch
    from torch import nn

    by_module: dict[str, int] = {}
    hooks = []

    def make(name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(module, nn.modules.conv._ConvNd):
                per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
                by_module[name] = by_module.get(name, 0) + output.numel() * per_out
            elif isinstance(module, nn.Linear):
                by_module[name] = by_module.get(name, 0) + output.numel() * module.in_features
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(module.register_forward_hook(make(name)))
    try:
        call(model, example)
    finally:
        for h in hooks:
            h.remove()
    return sum(by_module.values()), by_module


class Counter:
    """ONE MACs counter per model, the same for both tools: fvcore via dpruner.count_macs, or the hook fallback
    when fvcore cannot count the original model."""

    def __init__(self, model, example):
        self.example = example
        self.kind = "fvcore"
        self.fvcore_error = None
        try:
            total, by_module = self._fvcore(model)
        except Exception as exc:  # noqa: BLE001 - recorded, then the fallback
            self.fvcore_error = one_line(exc)
            self.kind = "hooks"
            total, by_module = hook_macs(model, example)
        self.base, self.base_by_module = total, by_module
        # a module's own MACs: its count minus its direct children's (fvcore's counts include the children), so a
        # parent named in a group (for a parameter it holds, e.g. a layer scale) does not count its children again
        children: dict[str, int] = {}
        for name, value in by_module.items():
            if name:
                parent = name.rpartition(".")[0]
                children[parent] = children.get(parent, 0) + value
        self.own = {name: value - children.get(name, 0) for name, value in by_module.items()}

    def _fvcore(self, model):
        from dpruner.metrics.macs import count_macs

        result = count_macs(model, self.example)
        if result.total <= 0:
            raise ValueError("fvcore counted 0 MACs")
        return result.total, result.by_module

    def __call__(self, model) -> int:
        return self._fvcore(model)[0] if self.kind == "fvcore" else hook_macs(model, self.example)[0]

    def leaf_share(self, names) -> float:
        """Share of the original MACs in the named layers (each module's own MACs, children not included)."""
        return sum(self.own.get(name, 0) for name in set(names)) / self.base


def changed_layers(original, pruned) -> list[str]:
    """Layers whose parameter shapes differ after pruning."""
    before = {n: tuple(p.shape) for n, p in original.named_parameters()}
    changed = set()
    for n, p in pruned.named_parameters():
        if before.get(n) != tuple(p.shape):
            changed.add(n.rpartition(".")[0])
    return sorted(changed)


def one_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:limit]


# ----------------------------------------------------------------------------------------------------- child
class State:
    """The child's result so far, written after every stage so that a killed child still reports progress."""

    def __init__(self, path: str, spec: str, tool: str):
        self.path = path
        self.data = {"model": spec, "tool": tool, "stage": "start"}

    def update(self, **kwargs):
        self.data.update(kwargs)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def check_structure(model, example, expected, variable_dim0) -> tuple[bool, str]:
    try:
        got = signature(call(model, example), variable_dim0)
    except Exception as exc:  # noqa: BLE001
        return False, f"forward fails: {one_line(exc)}"
    if got != expected:
        return False, f"output structure changed: {describe_difference(expected, got)}"
    return True, ""


def child(spec: str, tool: str, state_path: str) -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    state = State(state_path, spec, tool)
    model, example, ignored, variable_dim0 = build(spec)
    state.update(stage="built", params=sum(p.numel() for p in model.parameters()),
                 input=input_description(example))
    expected = signature(call(model, example), variable_dim0)
    counter = Counter(model, example)
    state.update(stage="counted", counter=counter.kind, fvcore_error=counter.fvcore_error, base_macs=counter.base)
    if tool == "dp":
        child_dp(state, model, example, expected, variable_dim0, counter)
    else:
        child_tp(state, model, example, ignored, expected, variable_dim0, counter, lambda: fresh_copy(model, spec))


def fresh_copy(model, spec):
    """A deep copy, or (for models that cannot be deep-copied, e.g. RAFT after a forward) the same model built
    again: build() seeds the generator, so the weights are identical."""
    try:
        return copy.deepcopy(model)
    except RuntimeError:
        return build(spec)[0]


def input_description(example) -> str:
    if isinstance(example, tuple):
        return " + ".join("x".join(map(str, t.shape)) for t in example)
    if isinstance(example, list):
        return "[" + ", ".join("x".join(map(str, t.shape)) for t in example) + "]"
    return "x".join(map(str, example.shape))


def child_dp(state, model, example, expected, variable_dim0, counter) -> None:
    import torch

    import dpruner
    from dpruner.errors import DprunerError, EngineError
    from dpruner.graph.summary import analyze_groups

    if isinstance(example, tuple):
        state.update(stage="done", result="n/a", reason="not applicable: two inputs (dpruner.prune takes one "
                                                         "example tensor)")
        return
    original = copy.deepcopy(model)
    given = example
    if isinstance(example, list):  # torchvision detectors take a list of images, or one batched tensor (as the CLI
        example = torch.stack(example)  # passes it); dpruner is given the tensor, the checks use the same list
    start = time.perf_counter()
    try:  # on a copy: the measurement must not change what prune() is given
        graph, index = analyze_groups(copy.deepcopy(model), example)
        layers = {layer for g in index.groups if g.prunable for layer in g.layers}
        share = counter.leaf_share(layers)
        state.update(stage="analyzed", prunable_share=share, groups=len(index.groups),
                     prunable_groups=sum(g.prunable for g in index.groups), analyze_s=time.perf_counter() - start)
        del graph, index
    except Exception as exc:  # noqa: BLE001 - prune below reports the same failure with its class
        state.update(stage="analyzed", prunable_share=None, analyze_error=one_line(exc))
    start = time.perf_counter()
    try:
        result = dpruner.prune(model, example, ratio=GOAL, method="l2")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the failure is the data
        state.update(stage="done", result="failed", reason=one_line(exc), prune_s=time.perf_counter() - start,
                     error_class=type(exc).__name__, engine_error=isinstance(exc, EngineError),
                     exit_code=getattr(exc, "exit_code", None) if isinstance(exc, DprunerError) else None,
                     traceback=traceback.format_exc()[-3000:])
        return
    reasons = [r for u in sorted(result.unprunable, key=lambda u: -u["channels"]) for r in u["reasons"][:1]]
    state.update(stage="pruned", prune_s=time.perf_counter() - start, target_met=result.target_met,
                 dp_ratio=result.ratio["macs"], unprunable_reasons=blockers(reasons)[:8], engine_error=False)
    example = given
    ok, why = check_structure(model, example, expected, variable_dim0)
    state.update(stage="checked", forward_ok=ok, forward_reason=why)
    try:
        macs = counter(model)
        state.update(macs_after=macs, ratio=counter.base / macs)
    except Exception as exc:  # noqa: BLE001
        state.update(ratio=None, count_error=one_line(exc))
    changed = changed_layers(original, model)
    state.update(changed_share=counter.leaf_share(changed), changed_layers=len(changed))
    state.update(stage="onnx")
    if isinstance(example, list):
        shape = (1, *example[0].shape)
    else:
        shape = tuple(example.shape)
    start = time.perf_counter()
    try:
        from dpruner.export.api import export_model

        with tempfile.TemporaryDirectory() as tmp:
            exported = export_model(model, shape, Path(tmp) / "model.onnx")
        verification = exported.verification
        state.update(onnx="passed" if verification.passed else "failed",
                     onnx_reason="" if verification.passed else f"verification: {verification.failure()}"[:200],
                     onnx_static_batch=not exported.info.dynamic_batch, onnx_row_sets=bool(verification.partial))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        state.update(onnx="failed", onnx_reason=one_line(exc, 200))
    state.update(stage="done", onnx_s=time.perf_counter() - start,
                 result="ok" if ok and (state.data.get("ratio") or 0) >= PRUNES_AT else "failed",
                 reason=reason_of(state.data))


def reason_of(d: dict) -> str:
    if not d.get("forward_ok"):
        return d.get("forward_reason", "")
    if d.get("ratio") is None:
        return f"MACs of the pruned model not countable: {d.get('count_error', '')}"
    if d["ratio"] < PRUNES_AT:
        why = f"reached only {d['ratio']:.2f}x MACs"
        blocked = blockers(d.get("unprunable_reasons") or [])
        return why + (f" (unprunable: {'; '.join(blocked[:3])})" if blocked else "")
    return ""


def blockers(reasons: list[str]) -> list[str]:
    """dpruner's reasons for unprunable groups, node names stripped and duplicates dropped."""
    out = []
    for reason in reasons:
        text = re.sub(r"^[\w.]+: ", "", reason)
        if text not in out and text != "network output":
            out.append(text)
    return out


def tp_prune(model, example, ratio, ignored_names):
    import torch_pruning as tp

    modules = dict(model.named_modules())
    inputs = example if isinstance(example, tuple) else (example,)
    pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[modules[n] for n in ignored_names])
    pruner.step()
    return model


def child_tp(state, model, example, ignored, expected, variable_dim0, counter, fresh) -> None:
    """Search the global channel pruning ratio r in [0, 0.9] so that MACs land within 5% of half: a secant step on
    log(MACs / half) inside the bracket (bisection when it leaves the bracket), fresh copy every time."""
    half = counter.base / GOAL
    state.update(ignored_layers=ignored)
    lo, hi = (0.0, math.log(counter.base / half)), None  # (r, f) with f > 0: not enough pruning yet
    trials = []
    best = None
    r = 1 - math.sqrt(1 / GOAL)
    start = time.perf_counter()
    for step in range(10):
        t0 = time.perf_counter()
        pruned = fresh()
        try:
            tp_prune(pruned, example, r, ignored)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the failure is the data
            state.update(stage="done", result="failed", reason=one_line(exc), trials=trials,
                         traceback=traceback.format_exc()[-3000:], search_s=time.perf_counter() - start)
            return
        ok, why = check_structure(pruned, example, expected, variable_dim0)
        try:
            macs = counter(pruned)
        except Exception as exc:  # noqa: BLE001
            macs, count_error = None, one_line(exc)
        trial = {"r": r, "macs": macs, "forward_ok": ok, "prune_s": time.perf_counter() - t0}
        trials.append(trial)
        if macs is None:
            state.update(stage="done", result="failed", forward_ok=ok, forward_reason=why, trials=trials,
                         reason=why or f"MACs of the pruned model not countable: {count_error}",
                         search_s=time.perf_counter() - start)
            return
        ratio = counter.base / macs
        candidate = {"r": r, "ratio": ratio, "forward_ok": ok, "forward_reason": why,
                     "changed_share": counter.leaf_share(changed_layers(model, pruned))}
        if best is None or abs(math.log(ratio / GOAL)) < abs(math.log(best["ratio"] / GOAL)):
            best = candidate
        state.update(stage=f"search {step}", trials=trials, best=best)
        if abs(macs / half - 1) <= TOLERANCE:
            break
        f = math.log(macs / half)
        if f > 0:
            lo = (r, f)
        else:
            hi = (r, f)
        if hi is None:  # not halved yet: extrapolate the line through (0, log 2) and (r, f), capped at 0.9
            if lo[0] >= 0.9:
                break  # even r=0.9 does not halve the MACs
            slope = (f - math.log(GOAL)) / r
            guess = r - f / slope if slope < 0 else 2 * r
            r = min(0.9, max(guess, r + 0.02))
        else:  # regula falsi inside the bracket, bisection when the step lands near an end
            (r0, f0), (r1, f1) = lo, hi
            guess = r0 - f0 * (r1 - r0) / (f1 - f0)
            r = guess if r0 + 0.05 * (r1 - r0) < guess < r1 - 0.05 * (r1 - r0) else (r0 + r1) / 2
    state.update(stage="done", search_s=time.perf_counter() - start, ratio=best["ratio"], r=best["r"],
                 forward_ok=best["forward_ok"], forward_reason=best["forward_reason"],
                 changed_share=best["changed_share"])
    state.update(result="ok" if best["forward_ok"] and best["ratio"] >= PRUNES_AT else "failed",
                 reason=reason_of(state.data))


# ----------------------------------------------------------------------------------------------------- parent
def run_isolated(spec: str, tool: str, timeout: float, mem_gb: float) -> dict:
    def limit():
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    fd, state_path = tempfile.mkstemp(prefix="coverage-", suffix=".json")
    os.close(fd)
    os.unlink(state_path)
    env = {**os.environ, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "YOLO_VERBOSE": "False",
           "YOLO_CONFIG_DIR": str(Path(tempfile.gettempdir()) / "coverage-yolo-config"),
           "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, __file__, "--one", spec, "--tool", tool, "--state", state_path]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                            env=env, start_new_session=True)
    timed_out = False
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    try:
        with open(state_path) as f:
            data = json.load(f)
        os.unlink(state_path)
    except (OSError, ValueError):
        data = {"model": spec, "tool": tool, "stage": "start"}
    data["wall_s"] = round(wall, 1)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = lines[-1][:200] if lines else ""
    memory = "MemoryError" in stderr or "bad_alloc" in stderr or "Cannot allocate memory" in stderr \
        or "out of memory" in stderr.lower()
    if timed_out:
        data.update(result="timeout", reason=f"over {timeout:.0f} s (stage reached: {data['stage']})")
    elif data.get("stage") != "done" or proc.returncode:
        if memory:
            data.update(result="memory", reason=f"over the {mem_gb:g} GB address-space cap "
                                                f"(stage reached: {data['stage']}): {tail}")
        else:
            data.update(result="failed", reason=f"crashed (exit {proc.returncode}, stage {data['stage']}): {tail}")
    if data.get("result") == "failed" and re.search(r"can't allocate memory|MemoryError|bad_alloc|Cannot allocate",
                                                    data.get("reason", "")):
        data.update(result="memory", reason=f"over the {mem_gb:g} GB address-space cap: {data['reason']}")
    if data.get("result") != "ok":
        data["stderr_tail"] = "\n".join(lines[-15:])[-3000:]
    return data


def load_results() -> dict[tuple[str, str], dict]:
    rows = {}
    if RESULTS_FILE.exists():
        for line in RESULTS_FILE.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["model"], row["tool"])] = row
    return rows


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for dist in ("dpruner", "torch", "torchvision", "torch-pruning", "timm", "fvcore", "onnx", "onnxruntime",
                 "segmentation-models-pytorch", "ultralytics"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = "not installed"
    return out


def mem_total_gb() -> float | None:
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        return round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def run(models: list[str], timeout: float, mem_gb: float, rerun: tuple[str, ...] = (),
        tools: tuple[str, ...] = ("dp", "tp")) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
            "timeout_s": timeout, "mem_gb": mem_gb, "cpus": os.cpu_count(), "mem_total_gb": mem_total_gb(), "machine": platform.machine(),
            "models": models}
    with open(RESULTS / "runs.jsonl", "a") as f:
        f.write(json.dumps(meta) + "\n")
    done = {key: row for key, row in load_results().items() if row["result"] not in rerun}
    for spec in models:
        for tool in tools:
            if (spec, tool) in done:
                continue
            row = run_isolated(spec, tool, timeout, mem_gb)
            row["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            with open(RESULTS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            ratio = row.get("ratio")
            print(f"{spec:<44} {tool} {row['result']:<8} {'' if ratio is None else f'{ratio:.2f}x':<7} "
                  f"{row['wall_s']:>6.1f}s {row.get('reason', '')[:110]}", flush=True)


# ----------------------------------------------------------------------------------------------------- report
def prunes(row: dict | None) -> bool:
    return bool(row) and row.get("result") == "ok"


def cell_result(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row["result"] == "ok":
        return "ok"
    return f"{row['result']}: {md(row.get('reason', ''))}" if row["result"] != "n/a" else md(row["reason"])


def md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def ratio_cell(row: dict | None) -> str:
    if not row or row.get("ratio") is None:
        return "-"
    return f"{row['ratio']:.2f}" + (" (hooks)" if row.get("counter") == "hooks" else "") + \
        (" (target not met)" if row.get("target_met") is False else "")


def cause(row: dict) -> str:
    """A failure's reason folded into a cause shared by several models (for the summary by cause)."""
    reason = row.get("reason", "")
    if row["result"] in ("timeout", "memory", "n/a"):
        return {"timeout": "timeout", "memory": "over the memory cap"}.get(row["result"], reason)
    m = re.match(r"UnsupportedError: torch\.fx cannot trace \w+ in eval mode \(TraceError: ([^.;)]*)", reason)
    if m:
        return f"torch.fx cannot trace the model ({m.group(1).strip()})"
    m = re.match(r"reached only [\d.]+x MACs \(unprunable: (.*?)(?:; |\)$)", reason)
    if m:
        text = re.sub(r"\[[\d, ]+\]", "[...]", re.sub(r"reshape \[.*?\] -> \[.*?\]", "reshape", m.group(1)))
        return f"below 1.5x: unprunable channels ({text})"
    if reason.startswith("UnsupportedError: Nothing in the model can be pruned"):
        m = re.search(r"\(\w+: ([^;]*)", reason)
        return f"nothing prunable ({m.group(1) if m else '?'})"
    if reason.startswith("forward fails") or reason.startswith("output structure changed"):
        return "pruned model broken: " + reason.split(":")[0]
    m = re.match(r"(\w+Error): (.*)", reason)
    if m:
        text = re.sub(r"\d+", "N", m.group(2))
        return f"{m.group(1)}: {text}"[:90]
    return reason[:90]


def report(models: list[str]) -> None:
    rows = load_results()
    runs = [json.loads(line) for line in (RESULTS / "runs.jsonl").read_text().splitlines() if line.strip()] \
        if (RESULTS / "runs.jsonl").exists() else []
    meta = runs[-1] if runs else {"versions": versions(), "timeout_s": "?", "mem_gb": "?"}
    complete = [m for m in models if (m, "dp") in rows and (m, "tp") in rows]
    finished = [r["finished"] for r in rows.values() if "finished" in r]
    dates = sorted({f[:10] for f in finished})
    total_s = sum(r.get("wall_s", 0) for r in rows.values() if r["model"] in models)
    v = meta["versions"]
    lines = ["# Coverage beyond torchvision classification: dpruner vs Torch-Pruning", ""]
    if len(complete) < len(models):
        lines += [f"**partial: {len(complete)} of {len(models)} models** (the run continues with the same command; "
                  "finished rows are skipped).", ""]
    lines += [
        "Generated by `bench/coverage.py` from `bench/results/coverage/results.jsonl` (raw JSON, one object per "
        "model and tool).",
        "",
        "```",
        "bash bench/setup.sh && .venv-bench/bin/python bench/coverage.py",
        "```",
        "",
        f"Run {', '.join(dates) or '?'} on the development machine ({meta.get('cpus', '?')} CPU cores, "
        f"{meta.get('mem_total_gb', '?')} GB, no GPU), 2 threads; each (model, tool) in its own process, limits {meta['timeout_s']:g} s and "
        f"{meta['mem_gb']:g} GB address space (RLIMIT_AS); total wall time {total_s / 60:.0f} min. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Every model is built with random weights (nothing downloaded). Both tools prune to 2x MACs with L2 "
        "magnitude: dpruner with `dpruner.prune(model, example, ratio=2.0, method=\"l2\")`; Torch-Pruning with "
        "`MetaPruner(..., importance=MagnitudeImportance(p=2), pruning_ratio=r, ignored_layers=<classifier or "
        "prediction heads>)`, r searched on fresh copies until the MACs are within 5% of half. MACs are counted "
        "by ONE counter for both tools on the same example input: `dpruner.count_macs` (fvcore); \"(hooks)\" marks "
        "models fvcore cannot count, where a conv/linear forward-hook counter is used for both.",
        "",
        "A tool **prunes** a model when the pruned model runs on the example input with the same output structure "
        "(dict keys, sequence lengths, tensor shapes; for torchvision detection the number of detections depends on "
        "the weights, so dim 0 of those tensors is not compared) and reached at least 1.5x MACs.",
        "",
        "Columns: *dp prunable* = MACs of the layers in dpruner's prunable channel groups / total "
        "(`dpruner.graph.summary.analyze_groups`); *changed* = MACs (of the original) in layers whose weights the "
        "tool resized; *ONNX* = `dpruner.export.api.export_model` of dpruner's result (opset 17, verified in "
        "ONNX Runtime; \"static batch\": the model's forward loops over the images, so the file has a fixed batch; "
        "\"row sets\": a detector's boxes, scores and labels compared as sets of rows, at least 95% matching; with "
        "random weights SSDlite's scores are all tied, so its rows cannot match); times are wall seconds of the "
        "whole isolated process (build, counting, pruning, checks, and for dpruner the ONNX export; for "
        "Torch-Pruning the whole ratio search).",
        "",
    ]
    both = only_dp = only_tp = neither = 0
    engine = []
    for m in complete:
        dp_ok, tp_ok = prunes(rows[(m, "dp")]), prunes(rows[(m, "tp")])
        both += dp_ok and tp_ok
        only_dp += dp_ok and not tp_ok
        only_tp += tp_ok and not dp_ok
        neither += not (dp_ok or tp_ok)
    for m in models:
        row = rows.get((m, "dp"))
        if row and row.get("engine_error"):
            engine.append(m)
    lines += [f"**models: {len(complete)}; both prune: {both}; only dpruner: {only_dp}; only Torch-Pruning: "
              f"{only_tp}; neither: {neither}.** dpruner EngineError (exit 70, a bug): "
              f"{', '.join(engine) if engine else 'none'}.", ""]
    family_counts = {}
    for m in complete:
        fam = FAMILIES[m.split(":")[0]]
        c = family_counts.setdefault(fam, [0, 0, 0])
        c[0] += 1
        c[1] += prunes(rows[(m, "dp")])
        c[2] += prunes(rows[(m, "tp")])
    lines += ["| family | models | dpruner prunes | Torch-Pruning prunes |", "|---|---|---|---|"]
    lines += [f"| {fam} | {c[0]} | {c[1]} | {c[2]} |" for fam, c in family_counts.items()]
    lines += ["", "| model | input | dpruner | dp MACs x | dp prunable | dp changed | ONNX | dp s | Torch-Pruning | "
              "TP MACs x | TP changed | TP s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        dp, tp = rows.get((m, "dp")), rows.get((m, "tp"))
        onnx = "-"
        if dp and dp.get("onnx"):
            onnx = dp["onnx"] if dp["onnx"] == "passed" else f"failed: {md(dp.get('onnx_reason', ''))}"
            notes = [n for n, on in (("static batch", dp.get("onnx_static_batch")),
                                     ("boxes compared as row sets", dp.get("onnx_row_sets"))) if on]
            onnx += f" ({', '.join(notes)})" if notes else ""
        inp = (dp or tp or {}).get("input", "")
        lines.append(
            f"| {m} | {inp} | {cell_result(dp)} | {ratio_cell(dp)} | {pct((dp or {}).get('prunable_share'))} | "
            f"{pct((dp or {}).get('changed_share'))} | {onnx} | {(dp or {}).get('wall_s', '-')} | {cell_result(tp)} | "
            f"{ratio_cell(tp)} | {pct((tp or {}).get('changed_share'))} | {(tp or {}).get('wall_s', '-')} |")
    for tool, title in (("dp", "dpruner"), ("tp", "Torch-Pruning")):
        groups: dict[str, list[str]] = {}
        for m in models:
            row = rows.get((m, tool))
            if row and row["result"] != "ok":
                groups.setdefault(cause(row), []).append(m)
        if groups:
            lines += ["", f"Where {title} does not prune, by cause:", "", "| cause | models |", "|---|---|"]
            for why, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"| {md(why)} | {len(names)}: {', '.join(names)} |")
    missing = [m for m in models if m not in complete]
    if missing:
        lines += ["", f"Not yet run: {', '.join(missing)}."]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}: {len(complete)} of {len(models)} models; both {both}, only dpruner {only_dp}, "
          f"only Torch-Pruning {only_tp}, neither {neither}")


def main() -> None:
    global RESULTS, RESULTS_FILE, DOC
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="only these specs (default: the full list)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model and tool")
    parser.add_argument("--mem-gb", type=float, default=10, help="address-space cap per model and tool")
    parser.add_argument("--rerun", nargs="*", default=[], choices=["timeout", "memory", "failed", "ok", "n/a"],
                        help="also rerun rows with these results (the newest row of a (model, tool) counts)")
    parser.add_argument("--tools", nargs="+", default=["dp", "tp"], choices=["dp", "tp"], help="run only these tools")
    parser.add_argument("--report-only", action="store_true", help="only regenerate docs/coverage.md")
    parser.add_argument("--list", action="store_true", help="print the model specs and exit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    parser.add_argument("--doc", type=Path, default=DOC, help="generated Markdown (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=["dp", "tp"], help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    RESULTS, RESULTS_FILE, DOC = args.results, args.results / "results.jsonl", args.doc
    if args.one:
        child(args.one, args.tool, args.state)
        return
    models = args.models or all_models()
    if args.list:
        print("\n".join(models))
        return
    if not args.report_only:
        run(models, args.timeout, args.mem_gb, tuple(args.rerun), tuple(args.tools))
    report(all_models())


if __name__ == "__main__":
    main()

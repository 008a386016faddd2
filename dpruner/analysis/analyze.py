"""`analyze`: per-layer structure, params, MACs and data-free redundancy of a model, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import nn

from dpruner.analysis.redundancy import DEFINITIONS, Measure, default_measures
from dpruner.metrics.macs import count_macs, count_params, run_forward

SCHEMA_VERSION = 1
TOP_REDUNDANT = 5  # layers listed in the summary
MIN_FILTERS_FOR_RANKING = 8  # layers narrower than this are not ranked as "most redundant"


@dataclass
class LayerInfo:
    """One analysed layer; `macs` come from fvcore for this module alone, `calls` counts forward calls."""

    name: str
    type: str
    in_channels: int
    out_channels: int
    groups: int | None
    kernel: list[int] | None
    params: int
    macs: int
    output_shape: list[int] | None
    calls: int
    redundancy: dict = field(default_factory=dict)


@dataclass
class Analysis:
    """The result of analyze(): the JSON document of `dpruner analyze --json` is `to_json()`."""

    params: int
    macs: int
    input_shape: list[int]
    layers: list[LayerInfo]
    other_macs: int  # MACs of ops outside the listed layers (pooling, matmuls, ...); rows + other = total
    uncounted_ops: dict[str, int]
    most_redundant: list[dict]
    source: dict = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)  # channel groups: coupled layers, prunable or why not
    groups_error: str | None = None  # why the dependency graph could not be built, if it could not
    opaque: list[dict] = field(default_factory=list)  # modules torch.fx could not follow (module, reason, whole)
    prunable_macs_share: float | None = None  # share of the MACs in layers a prunable channel group touches

    def to_json(self) -> dict:
        """A versioned, JSON-serialisable document (schema in docs/analyze.md)."""
        return {
            "schema": SCHEMA_VERSION,
            "source": self.source,
            "model": {
                "params": self.params,
                "macs": self.macs,
                "input_shape": self.input_shape,
                "other_macs": self.other_macs,
                "uncounted_ops": self.uncounted_ops,
            },
            "layers": [asdict(layer) for layer in self.layers],
            "summary": {"most_redundant": self.most_redundant},
            "groups": self.groups,
            "groups_error": self.groups_error,
            "opaque": self.opaque,
            "prunable_macs_share": self.prunable_macs_share,
            "definitions": DEFINITIONS,
        }


def _describe(module: nn.Module) -> tuple[int, int, int | None, list[int] | None]:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.in_channels, module.out_channels, module.groups, list(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, None, None
    width = getattr(module, "num_features", 0)  # BatchNorm, or a user-registered type
    return width, width, None, None


def _record_outputs(model: nn.Module, example_input: torch.Tensor, names: Mapping[nn.Module, str]):
    """Output shape of each listed module's first call, and how often it was called, via forward hooks."""
    shapes: dict[str, list[int]] = {}
    calls: dict[str, int] = {}

    def hook(module, _inputs, output):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if name not in shapes and isinstance(output, torch.Tensor):
            shapes[name] = list(output.shape)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        run_forward(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes, calls


def _redundancy_score(layer: LayerInfo) -> float | None:
    """1 - k95 / min(filters, fan-in): the share of the filter matrix's possible rank that 95% of its variance does
    not need. Dividing by the rank bound, not the filter count, keeps a first layer (32 filters of 9 weights: rank
    <= 9) from ranking high merely because it is wider than its fan-in."""
    pca = layer.redundancy.get("pca")
    if not pca or pca.get("filters", 0) < MIN_FILTERS_FOR_RANKING or "k95" not in pca:
        return None
    return 1.0 - pca["k95"] / pca["rank_bound"]


def analyze(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    measures: Mapping[type, Measure] | None = None,
    full: bool = False,
    source: dict | None = None,
    data=None,
    score_batches: int = 10,
) -> Analysis:
    """Analyse every layer whose type has a measure (Conv2d, ConvTranspose2d, Linear, BatchNorm2d by default).

    `input_shape` is N,C,H,W; MACs are for that batch size. `full` lifts the cost limit on PCA/GM measures of huge
    layers. The model's train/eval mode is restored afterwards. With `data` (an iterable of (inputs, labels)), each
    channel group also gets the widths PCA would keep (`pca_widths`: explained-variance share -> channels, from
    `score_batches` batches; see --allocation pca).
    """
    from dpruner.validate import finite_weights

    finite_weights(model, "The model")
    measures = default_measures(full=full) if measures is None else measures
    was_training = model.training
    model.eval()
    try:
        example = torch.randn(*input_shape)
        targets = {m: name for name, m in model.named_modules() if _measure_for(m, measures) is not None}
        shapes, calls = _record_outputs(model, example, targets)
        macs = count_macs(model, example)
        layers = []
        for module, name in targets.items():
            in_ch, out_ch, groups, kernel = _describe(module)
            layers.append(
                LayerInfo(
                    name=name,
                    type=type(module).__name__,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    groups=groups,
                    kernel=kernel,
                    params=sum(p.numel() for p in module.parameters(recurse=False)),
                    macs=macs.by_module.get(name, 0),
                    output_shape=shapes.get(name),
                    calls=calls.get(name, 0),
                    redundancy=_measure_for(module, measures)(module),
                )
            )
    finally:
        model.train(was_training)
    groups, groups_error, opaque, share = coupling(model, input_shape, macs, data=data, score_batches=score_batches)
    ranked = sorted(
        ((score, layer) for layer in layers if (score := _redundancy_score(layer)) is not None),
        key=lambda item: -item[0],
    )
    most = [
        {"name": layer.name, "score": round(score, 4), "reason": "1 - k95/min(filters, fan-in) (PCA of the filter matrix)"}
        for score, layer in ranked[:TOP_REDUNDANT]
        if score > 0
    ]
    return Analysis(
        params=count_params(model),
        macs=macs.total,
        input_shape=list(input_shape),
        layers=layers,
        other_macs=macs.total - sum(layer.macs for layer in layers),
        uncounted_ops=macs.uncounted_ops,
        most_redundant=most,
        source=dict(source or {}),
        groups=groups,
        groups_error=groups_error,
        opaque=opaque,
        prunable_macs_share=share,
    )


PCA_SHARES = (0.9, 0.95, 0.99)  # explained-variance shares for which `analyze --data` reports each group's width


def coupling(model: nn.Module, input_shape, macs=None, *, data=None,
             score_batches: int = 10) -> tuple[list[dict], str | None, list[dict], float | None]:
    """The channel groups of the model's dependency graph: which layers lose channels together, and for groups
    that cannot be pruned, the node and reason; the modules torch.fx could not follow; the share of the MACs
    (`macs`: a MacCount) that prunable groups reach. A graph that cannot be built is reported, not raised."""
    from dpruner.errors import DprunerError
    from dpruner.graph.summary import analyze_groups, opaque_summary, prunable_macs_share

    try:
        graph, index = analyze_groups(model, torch.randn(*input_shape))
    except DprunerError as exc:
        return [], str(exc), [], None
    except Exception as exc:  # a bug in a graph rule must not cost the user the rest of the analysis
        return [], (f"the dependency graph could not be built ({type(exc).__name__}: {exc}); this is a bug in "
                    "dpruner"), [], None
    spectra = {}
    if data is not None:
        from dpruner.criteria.stats import collect_stats

        spectra = {gid: st["spectrum"].numpy() for gid, st in
                   collect_stats(model, graph, index, data, needs=["spectrum"], batches=score_batches).items() if st}
    out = []
    for g in index.groups:
        if not g.has_producer:
            continue  # the network input's channels: never pruned, nothing to report
        entry = {"id": g.id, "channels": len(g), "layers": g.layers, "prunable": g.prunable,
                 "reasons": g.reasons[:5]}
        if g.id in spectra:
            from dpruner.methods.oneshot import pca_width

            entry["pca_widths"] = {f"{share:g}": pca_width(spectra[g.id], share) for share in PCA_SHARES}
        out.append(entry)
    share = prunable_macs_share(index, macs.by_module, macs.total) if macs is not None else None
    return out, None, opaque_summary(graph), share


def _measure_for(module: nn.Module, measures: Mapping[type, Measure]) -> Measure | None:
    """The measure registered for the module's exact type, else for its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in measures:
            return measures[cls]
    return None

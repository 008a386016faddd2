"""analyze on every torchvision classification model (smoke test: it runs and its numbers add up)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (or does not work with this torch)")

from dpruner.analysis import analyze  # noqa: E402
from dpruner.analysis.redundancy import default_measures  # noqa: E402
from dpruner.io.arch import build_model  # noqa: E402

# Models above this size are skipped (documented in docs/analyze.md): building and tracing them takes minutes and
# gigabytes on a 2-core CI machine, and they add no op or layer kind the smaller members of their family lack.
MAX_PARAMS = 150_000_000
# Transformers need their native resolution (fixed position embeddings/windows); conv nets are analysed at 128x128
# to keep the sweep fast: the layer set and every code path are the same as at 224.
NATIVE_224 = ("vit_", "swin_", "maxvit_")
MODELS = torchvision.models.list_models(module=torchvision.models)
# The sweep is about graph coverage. PCA/GM run the same code on every layer size (tests/analysis/test_redundancy.py
# checks their numbers), so here they run only on layers below a tenth of the default cost limit; larger layers take
# the "skipped" path, which the sweep thus covers too. This halves the sweep's time on the 100M-parameter models.
SWEEP_MAX_COST = 2e9


def _param_count(name: str) -> int:
    """Parameters of a torchvision model, for the size check only: from its weights' metadata (no download, no
    build; the smallest count when weight sets differ, e.g. ViT at 224 and 384), else counted on the meta device."""
    try:
        counts = [w.meta["num_params"] for w in torchvision.models.get_model_weights(name)]
    except (ValueError, KeyError):
        counts = []
    if counts:
        return min(counts)
    with torch.device("meta"):  # no memory, no init
        model = build_model(f"torchvision:{name}")
    return sum(p.numel() for p in model.parameters())


def skip_if_too_large(name: str) -> None:
    """Skip the calling test for models above MAX_PARAMS."""
    n_params = _param_count(name)
    if n_params > MAX_PARAMS:
        pytest.skip(f"{name} has {n_params / 1e6:.0f}M parameters, above the {MAX_PARAMS / 1e6:.0f}M limit")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_analyze_torchvision_model(name):
    skip_if_too_large(name)
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}").eval()
    n_params = sum(p.numel() for p in model.parameters())
    size = 224 if name.startswith(NATIVE_224) else 128
    result = analyze(model, (1, 3, size, size), measures=default_measures(max_cost=SWEEP_MAX_COST))
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d))]
    assert [layer.name for layer in result.layers] == expected
    assert result.params == n_params
    assert result.macs > 0 and result.macs == sum(layer.macs for layer in result.layers) + result.other_macs
    convs = [layer for layer in result.layers if layer.type == "Conv2d" and layer.calls]
    assert all(layer.macs > 0 and layer.output_shape for layer in convs)
    filter_layers = [layer.redundancy for layer in result.layers if layer.type in ("Conv2d", "Linear")]
    assert all("l1" in r and ("pca" in r) != ("skipped" in r) for r in filter_layers)
    json.dumps(result.to_json())

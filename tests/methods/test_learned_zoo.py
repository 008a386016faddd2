"""The learned methods (spp, gate, coarse, one-shot --soft) on real torchvision architectures: residual,
depthwise + squeeze-excitation, and ConvNeXt's permuting LayerNorm. Random weights and synthetic data: this pins
the mechanics (a dense model at the ratio that runs, nothing added to it), not accuracy."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpruner.data.loaders import DataBundle
from dpruner.methods.coarse import CoarseConfig
from dpruner.methods.gate import GateConfig
from dpruner.methods.run import OneShotConfig, run
from dpruner.methods.spp import SPPConfig
from dpruner.train.config import TrainConfig

torchvision = pytest.importorskip("torchvision")

CONFIGS = {
    "spp": SPPConfig(ratio=1.5, A=0.5),
    "gate": GateConfig(ratio=1.5, prune_every=0.5),
    "coarse": CoarseConfig(ratio=1.5, candidates=2, eval_batches=1),
    "one-shot": OneShotConfig(ratio=1.5, criterion="fpgm", soft=True, soft_every=0.5),
}


@pytest.fixture(scope="module")
def synthetic():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    return DataBundle("synthetic", 10, (3, 32, 32), loader, loader, None, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_learned_method_on_torchvision(arch, method, synthetic):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    keys = set(model.state_dict())
    example = torch.randn(1, 3, 32, 32)
    result = run(method, model, example, CONFIGS[method], data=synthetic,
                 train=TrainConfig(epochs=2, lr=0.001, quiet=True), distill=False)
    assert result.target_met and result.ratio["macs"] == pytest.approx(1.5, rel=0.05)
    assert set(result.model.state_dict()) == keys
    with torch.no_grad():
        assert result.model.eval()(example).shape == (1, 10)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CONFIGS))
def test_exported_graph_has_the_dense_originals_node_types(method, synthetic, tmp_path):
    """No gate, mask, probability or scorer survives into the deployable graph: the ONNX export of the result has
    exactly the node types of the unpruned model's."""
    import onnx

    from dpruner.export.onnx import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = run(method, model, torch.randn(1, 3, 32, 32), CONFIGS[method], data=synthetic,
                 train=TrainConfig(epochs=2, lr=0.001, quiet=True), distill=False)
    kinds = []
    for name, net in (("dense", model), ("pruned", result.model)):
        path = tmp_path / f"{name}.onnx"
        export_onnx(net.eval(), (1, 3, 32, 32), path)
        # Identity nodes only alias initializers the exporter found identical (the untrained model's equal folded
        # biases); they are not computation
        kinds.append(sorted({node.op_type for node in onnx.load(str(path)).graph.node} - {"Identity"}))
    assert kinds[0] == kinds[1] and "Conv" in kinds[1]

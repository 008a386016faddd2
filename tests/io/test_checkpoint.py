"""Every accepted checkpoint format, and every bad input with its one-sentence error."""

from __future__ import annotations

import zipfile

import pytest
import torch

from dpruner.errors import ArchError, CheckpointError, InputError
from dpruner.io import load_checkpoint, load_model, save_checkpoint
from tests.conftest import ROOT, TinyNet

ARCH = f"{ROOT / 'tests' / 'conftest.py'}:tiny_net"
X = torch.randn(2, 1, 7, 7)


def same_outputs(a, b) -> bool:
    with torch.no_grad():
        return torch.allclose(a(X), b(X))


@pytest.fixture
def net():
    torch.manual_seed(1)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial BN statistics so a forgotten buffer shows up in the outputs
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.0},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
    ids=["plain", "under-state_dict", "under-model", "dataparallel", "dataparallel-under-state_dict", "compiled"],
)
def test_state_dict_variants_load_with_arch(tmp_path, net, wrap):
    path = tmp_path / "w.pt"
    torch.save(wrap(net.state_dict()), path)
    loaded = load_checkpoint(path, arch=ARCH)
    assert loaded.source_format == "state_dict"
    assert not loaded.model.training
    assert same_outputs(net, loaded.model)


def test_missing_num_batches_tracked_is_tolerated(tmp_path, net):
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "w.pt")
    assert same_outputs(net, load_model(tmp_path / "w.pt", arch=ARCH))


def test_module_factory_spec(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "w.pt")
    assert same_outputs(net, load_model(tmp_path / "w.pt", arch="tests.conftest:tiny_net"))


def test_torchvision_spec_with_num_classes(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r18.pt")
    loaded = load_model(tmp_path / "r18.pt", arch="torchvision:resnet18", num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def test_wrong_num_classes_suggests_the_right_one(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ArchError, match=r"fc.weight: file \[7, 512\] vs model \[1000, 512\].*--num-classes 7"):
        load_model(tmp_path / "r18.pt", arch="torchvision:resnet18")


def test_pickled_module_refused_by_default_and_accepted_with_trust(tmp_path, net):
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match="arbitrary code.*--trust-checkpoint"):
        load_model(path)
    loaded = load_checkpoint(path, trust_checkpoint=True)
    assert loaded.source_format == "pickled-module"
    assert same_outputs(net, loaded.model)


def test_module_under_a_key_needs_trust(tmp_path, net):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net, "epoch": 4}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(path)
    assert same_outputs(net, load_model(path, trust_checkpoint=True))


def test_dpruner_checkpoint_round_trip_needs_no_arguments(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    path = save_checkpoint(tmp_path / "d.pt", model, arch="torchvision:resnet18", num_classes=3,
                           input_shape=(1, 3, 32, 32), meta={"note": "x"})
    raw = torch.load(path, weights_only=True)  # the format is weights_only-safe by construction
    assert raw["dpruner_checkpoint"] == 1
    loaded = load_checkpoint(path)
    assert (loaded.arch, loaded.num_classes, loaded.input_shape, loaded.meta) == (
        "torchvision:resnet18", 3, (1, 3, 32, 32), {"note": "x"})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_dpruner_checkpoint_with_a_file_arch_needs_confirmation(tmp_path, net):
    path = save_checkpoint(tmp_path / "d.pt", net, arch=ARCH)
    with pytest.raises(CheckpointError, match="would import and run that code"):
        load_model(path)
    assert same_outputs(net, load_model(path, arch=ARCH))
    assert same_outputs(net, load_model(path, trust_checkpoint=True))


def test_dpruner_checkpoint_of_a_newer_version(tmp_path, net):
    path = save_checkpoint(tmp_path / "d.pt", net, arch="tests.conftest:tiny_net")
    ckpt = torch.load(path, weights_only=True)
    ckpt["dpruner_checkpoint"] = 99
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(path)


def test_output_never_overwrites_input(tmp_path, net):
    path = tmp_path / "in.pt"
    torch.save(net.state_dict(), path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="Refusing to overwrite the input"):
        save_checkpoint(path, net, arch=ARCH, inputs=[path])
    assert path.read_bytes() == before


# ---- bad inputs: one sentence each -------------------------------------------------------------------------------


def test_missing_file():
    with pytest.raises(InputError, match="No such file"):
        load_model("/nonexistent/model.pt")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_model(tmp_path)


def test_truncated_file(tmp_path, net):
    good = tmp_path / "good.pt"
    torch.save(net.state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(bad, arch=ARCH)


def test_corrupt_member_in_zip(tmp_path, net):
    good = tmp_path / "good.pt"
    torch.save(net.state_dict(), good)
    bad = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"garbage" if info.filename.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(bad, arch=ARCH)


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_model(tmp_path / "e.pt")


def test_random_bytes(tmp_path):
    (tmp_path / "r.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "r.pt")


def test_torchscript_archive(tmp_path, net):
    torch.jit.save(torch.jit.trace(net, X), tmp_path / "ts.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_model(tmp_path / "ts.pt")


def test_onnx_file(tmp_path, net):
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (X,), str(path), dynamo=False)
    with pytest.raises(CheckpointError, match="ONNX model"):
        load_model(path)


def test_state_dict_without_arch(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ArchError, match="holds only weights.*--arch"):
        load_model(tmp_path / "w.pt")


def test_dict_without_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_model(tmp_path / "w.pt", arch=ARCH)


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path, net):
    sd = net.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ArchError, match=r"1 missing keys \(fc.bias\), 1 unexpected keys \(extra.weight\)"):
        load_model(tmp_path / "w.pt", arch=ARCH)


def test_wrong_arch_shape_mismatch(tmp_path):
    torch.save(TinyNet(num_classes=9).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ArchError, match=r"2 shape mismatches \(fc.weight: file \[9, 54\] vs model \[5, 54\]; fc.bias.*--num-classes 9"):
        load_model(tmp_path / "w.pt", arch=ARCH)


def test_completely_wrong_arch_names_only_the_first_keys(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ArchError) as info:
        load_model(tmp_path / "w.pt", arch=ARCH)
    message = str(info.value)
    assert "more" in message and len(message) < 600 and "\n" not in message


def test_safetensors_file(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="safetensors file"):
        load_model(tmp_path / "m.safetensors")


def test_import_dpruner_is_lazy():
    import subprocess
    import sys

    code = "import sys, dpruner; assert 'torch' not in sys.modules; assert callable(dpruner.load_model)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

"""Architecture specs: the three forms and their errors."""

from __future__ import annotations

import pytest

from dpruner.errors import ArchError
from dpruner.io.arch import build_model, parse_arch
from tests.conftest import ROOT, TinyNet


def test_parse_forms():
    assert parse_arch("torchvision:resnet18").kind == "torchvision"
    assert parse_arch("models/net.py:build").kind == "file"
    assert parse_arch("pkg.models:build") == parse_arch(" pkg.models:build ")
    assert parse_arch("pkg.models:build").kind == "module"
    assert parse_arch("torchvision:resnet18").trusted and parse_arch("dpruner.zoo:resnet56").trusted
    assert not parse_arch("evil.py:f").trusted and not parse_arch("evil:f").trusted


@pytest.mark.parametrize("spec", ["resnet18", "torchvision:", ":f", "not a module:f"])
def test_malformed_specs(spec):
    with pytest.raises(ArchError):
        parse_arch(spec)


def test_file_factory_and_num_classes():
    model = build_model(f"{ROOT / 'tests' / 'conftest.py'}:tiny_net", num_classes=3)
    assert type(model).__name__ == "TinyNet" and model.fc.out_features == 3


def test_module_factory():
    assert isinstance(build_model("tests.conftest:tiny_net"), TinyNet)


def test_unknown_torchvision_name_suggests_close_matches():
    with pytest.raises(ArchError, match="no model named 'resnet19'.*resnet18"):
        build_model("torchvision:resnet19")


def test_torchvision_detection_builder_does_not_download():
    model = build_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_missing_file():
    with pytest.raises(ArchError, match="does not exist"):
        build_model("no/such/file.py:f")


def test_missing_factory():
    with pytest.raises(ArchError, match="no callable named 'nope'"):
        build_model("tests.conftest:nope")


def test_unimportable_module():
    with pytest.raises(ArchError, match="cannot be imported"):
        build_model("no_such_package_xyz.models:f")


def test_factory_returning_non_module():
    with pytest.raises(ArchError, match="not a torch.nn.Module"):
        build_model("tests.conftest:not_a_model")


def test_factory_that_fails():
    with pytest.raises(ArchError, match="Calling 'tests.conftest:shared_data' failed: TypeError"):
        build_model("tests.conftest:shared_data")  # needs an argument


def test_factory_without_num_classes():
    with pytest.raises(ArchError, match="takes no num_classes"):
        build_model("tests.conftest:not_a_model", num_classes=3)


def test_dpruner_modules_other_than_the_zoo_are_no_architectures():
    with pytest.raises(ArchError, match="not one of dpruner.s architectures.*dpruner.zoo:resnet56"):
        build_model("dpruner.cli.app:main")


def test_broken_file(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ArchError, match="Importing .* failed: RuntimeError: boom"):
        build_model(f"{tmp_path / 'broken.py'}:f")


def test_timm_builder_without_weights_and_its_default_shape():
    pytest.importorskip("timm", reason="timm (a test dependency) is not installed")
    from dpruner.io.arch import default_input_shape, parse_arch

    model = build_model("timm:resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert parse_arch("timm:resnet18").trusted  # a documented builder: pretrained=False, network blocked
    assert default_input_shape("timm:resnet18") == (1, 3, 224, 224)
    assert default_input_shape("timm:tf_efficientnet_b3") == (1, 3, 300, 300)
    with pytest.raises(ArchError, match="timm has no model named 'resnet19'. Did you mean resnet18"):
        build_model("timm:resnet19")


def kwargs_factory(**kwargs):
    """A factory taking **kwargs (as timm's and many repositories' do): --num-classes reaches it."""
    from tests.conftest import TinyNet

    return TinyNet(**kwargs)


def test_num_classes_reaches_a_factory_taking_kwargs():
    model = build_model("tests.io.test_arch:kwargs_factory", num_classes=3)
    assert model.fc.out_features == 3

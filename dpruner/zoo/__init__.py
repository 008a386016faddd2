"""Architectures dpruner ships, addressable as `--arch dpruner.zoo:NAME`."""

from dpruner.zoo.cifar_resnet import resnet20, resnet32, resnet44, resnet56
from dpruner.zoo.digits import digits_resnet, digits_vgg

__all__ = ["digits_resnet", "digits_vgg", "resnet20", "resnet32", "resnet44", "resnet56"]

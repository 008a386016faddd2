"""--input-shape parsing and atomic writes."""

from __future__ import annotations

import os

import pytest

from dpruner.errors import InputError, ShapeError
from dpruner.io.atomic import atomic_write, atomic_write_bytes
from dpruner.io.shapes import parse_input_shape, resolve_input_shape


@pytest.mark.parametrize(
    "text,expected",
    [("3,224,224", (1, 3, 224, 224)), ("8,3,32,32", (8, 3, 32, 32)), ("3x32x32", (1, 3, 32, 32)),
     ("(1, 8, 8)", (1, 1, 8, 8)), ([3, 16, 16], (1, 3, 16, 16))],
)
def test_parse(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["224,224", "1,2,3,4,5", "3,a,224", "3,0,224", "", "3,-1,4"])
def test_parse_rejects(text):
    with pytest.raises(ShapeError, match="C,H,W"):
        parse_input_shape(text)


def test_resolve_order():
    assert resolve_input_shape("3,8,8", stored=[1, 1, 4, 4]) == ((1, 3, 8, 8), "--input-shape")
    assert resolve_input_shape(None, stored=[1, 1, 4, 4]) == ((1, 1, 4, 4), "checkpoint")
    assert resolve_input_shape(None, arch="torchvision:resnet18")[1] == "torchvision default"
    with pytest.raises(ShapeError, match="--input-shape"):
        resolve_input_shape(None, arch="tests.conftest:tiny_net")


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left behind
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_atomic_write_refuses_input_and_bad_folder(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(InputError, match="input file"):
        atomic_write_bytes(src, b"y", inputs=[src])
    with pytest.raises(InputError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "o.pt", b"y")
    with pytest.raises(InputError, match="is a directory"):
        atomic_write_bytes(tmp_path, b"y")

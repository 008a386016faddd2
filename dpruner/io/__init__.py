"""Checkpoints in and out: safe loading, architecture specs, dpruner's own format, atomic writes."""

from dpruner.io.checkpoint import load_checkpoint, load_model
from dpruner.io.dpruner_format import LoadedModel, make_checkpoint, save_checkpoint
from dpruner.io.shapes import parse_input_shape

__all__ = ["LoadedModel", "load_checkpoint", "load_model", "make_checkpoint", "parse_input_shape", "save_checkpoint"]

"""Measurements of a model: parameters and MACs (later: file size, latency)."""

from dpruner.metrics.macs import MacCount, count_macs, count_params, count_sizes

__all__ = ["MacCount", "count_macs", "count_params", "count_sizes"]

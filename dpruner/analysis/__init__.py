"""Model analysis: structure, params, MACs and data-free filter redundancy per layer."""

from dpruner.analysis.analyze import Analysis, LayerInfo, analyze

__all__ = ["Analysis", "LayerInfo", "analyze"]

"""Surgery: resize layers in place, and pruning plans as replayable data."""

from dpruner.surgery.plan import apply_plan, make_plan

__all__ = ["apply_plan", "make_plan"]

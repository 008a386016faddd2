"""Pruning methods: planners and schedules that compose criteria (one-shot ratio/sparsity now)."""

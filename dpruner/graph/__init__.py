"""The dependency graph: torch.fx tracing, op rules, and channel groups that must be pruned together."""

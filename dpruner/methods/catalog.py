"""What dpruner can do, as data: the pruning methods, the channel criteria and the allocations, one line each with
what each needs (`dpruner methods` renders it)."""

from __future__ import annotations

ALLOCATION_SUMMARIES = {
    "uniform": "the same fraction of channels from every prunable group (the fraction is searched for the target)",
    "global": "one threshold on scores normalised per group, across all groups",
    "pca": "each group keeps the width whose principal components explain a share of its activations' variance "
           "(--pca-energy, or searched for --ratio); seed 001",
    "sensitivity": "each group's cut read from its measured sensitivity curve (the group pruned alone at 10..90%), "
                   "for the least summed predicted loss increase at the target; cached (analyze --sensitivity)",
}
ALLOCATION_NEEDS = {"pca": ["data"], "sensitivity": ["data"]}

def catalog() -> dict:
    """{'methods': [...], 'criteria': [...], 'allocations': [...]}: name, summary and needs of each."""
    from dpruner.criteria import CRITERIA
    from dpruner.methods.oneshot import ALLOCATIONS
    from dpruner.methods.run import METHODS

    criteria = [{"name": c.name, "summary": c.summary, "needs": sorted(c.needs),
                 "data": c.needs_data} for c in CRITERIA.values()]
    allocations = [{"name": name, "summary": ALLOCATION_SUMMARIES[name], "needs": ALLOCATION_NEEDS.get(name, ["weights"])}
                   for name in ALLOCATIONS]
    methods = [{"name": m.name, "how": m.how, "summary": m.summary, "needs": sorted(m.needs) or ["weights"],
                "goals": sorted(m.goals)} for m in METHODS.values()]
    return {"methods": methods, "criteria": criteria, "allocations": allocations}

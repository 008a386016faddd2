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

METHODS = [
    {"name": "one-shot", "how": "--ratio / --sparsity, no --data",
     "summary": "score every group, plan to the target (MACs or params), cut once; no training",
     "needs": ["weights"]},
    {"name": "one-shot + fine-tune", "how": "--ratio / --sparsity with --data",
     "summary": "cut once to the target, then fine-tune for --budget-epochs (distilling from the original)",
     "needs": ["data", "training"]},
    {"name": "tolerance", "how": "--tolerance 1% with --data",
     "summary": "Play-and-Prune: prune, fine-tune with an L1 push, measure, adapt the rate until accuracy "
                "would drop past the tolerance",
     "needs": ["data", "training"]},
    {"name": "pca-gm", "how": "--method pca-gm with --data, and --ratio or --pca-energy",
     "summary": "seed 001: widths from PCA of each group's activations, survivors nearest the geometric median go "
                "last (FPGM)",
     "needs": ["data"]},
]


def catalog() -> dict:
    """{'methods': [...], 'criteria': [...], 'allocations': [...]}: name, summary and needs of each."""
    from dpruner.criteria import CRITERIA
    from dpruner.methods.oneshot import ALLOCATIONS

    criteria = [{"name": c.name, "summary": c.summary, "needs": sorted(c.needs),
                 "data": c.needs_data} for c in CRITERIA.values()]
    allocations = [{"name": name, "summary": ALLOCATION_SUMMARIES[name], "needs": ALLOCATION_NEEDS.get(name, ["weights"])}
                   for name in ALLOCATIONS]
    return {"methods": [dict(m) for m in METHODS], "criteria": criteria, "allocations": allocations}

"""Channel groups: the prunable channels of a DependencyGraph, bundled by the set of layers they touch.

A *channel* is one class of coupled atoms: removing it removes one row of every producing layer, the matching
columns of every consumer, the per-channel entries of every norm and parameter, and shrinks any padding it is
added to. Channels that touch the same slots form a *group* (e.g. all channels of a ResNet stage's residual stream);
criteria score channels within a group and planners decide how many each group keeps.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from dpruner.graph.build import DependencyGraph


@dataclass
class Group:
    """Channels that touch the same slots. `slots` are keys into DependencyGraph.slots."""

    id: int
    channels: list[int]  # class roots, in order of first appearance
    slots: list[tuple]
    prunable: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Module names in this group, producers first."""
        out = [s[0] for s in self.slots if s[1] == "out"]
        return out + [s[0] for s in self.slots if s[1] != "out" and s[0] not in out]

    @property
    def has_producer(self) -> bool:
        """True when a layer computes these channels (False for the network input's channels)."""
        return any(s[1] == "out" for s in self.slots)

    def __len__(self) -> int:
        return len(self.channels)


@dataclass
class ChannelIndex:
    """Dense numbering of every class that appears in a slot, with each slot's positions mapped to it."""

    roots: np.ndarray  # dense index -> class root
    slot_classes: dict[tuple, np.ndarray]  # slot key -> dense class index of each position
    groups: list[Group]
    blocked: dict[int, list[str]]

    def positions(self, slot_key: tuple, channel_root: int) -> np.ndarray:
        """Positions of one channel within one slot."""
        dense = int(np.searchsorted(self.roots, channel_root))
        return np.nonzero(self.slot_classes[slot_key] == dense)[0]


def channel_groups(graph: DependencyGraph, *, exclude: tuple[str, ...] = ()) -> ChannelIndex:
    """Number the classes, protect excluded layers, and bundle channels into groups."""
    atoms = graph.atoms
    blocked = atoms.blocked_reasons()
    for key, slot in graph.slots.items():
        if any(fnmatch.fnmatchcase(slot.module, pattern) for pattern in exclude):
            for root in set(atoms.roots(slot.atoms).tolist()):
                blocked.setdefault(root, []).append(f"{slot.module}: protected by --exclude")
    slot_roots = {key: atoms.roots(slot.atoms) for key, slot in graph.slots.items()}
    all_roots = np.unique(np.concatenate([r for r in slot_roots.values()] or [np.zeros(0, np.int64)]))
    slot_classes = {key: np.searchsorted(all_roots, r) for key, r in slot_roots.items()}

    # Which slots each class touches, vectorised (depthwise nets have tens of thousands of classes): unique
    # (class, slot) pairs sorted by class, then slot order. Classes touching the same set of slots (and equally
    # prunable) form one group; sets are compared through a seeded random 64-bit sum per set (for a thousand
    # distinct sets a collision has a chance of about 1e-13).
    keys = list(slot_classes)
    n_keys = max(len(keys), 1)
    pairs = np.unique(np.concatenate([dense * n_keys + order for order, dense in enumerate(slot_classes.values())]
                                     or [np.zeros(0, np.int64)]))
    groups: list[Group] = []
    if not len(pairs):
        return ChannelIndex(all_roots, slot_classes, groups, blocked)
    cls, order = pairs // n_keys, pairs % n_keys
    starts = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    salts = np.random.default_rng(0).integers(0, 2**63, size=n_keys + 1, dtype=np.int64).astype(np.uint64)
    producers = np.array([graph.slots[k].role == "out" for k in keys])
    roots = all_roots[cls[starts]]
    ok = np.logical_or.reduceat(producers[order], starts) & ~np.isin(roots, list(blocked))
    signature = np.add.reduceat(salts[order], starts) + ok.astype(np.uint64) * salts[-1]  # uint64 sums wrap: fine
    # Classes in order of the first slot they appear in, then by root: this fixes group and channel numbering.
    perm = np.lexsort((roots, order[starts]))
    _, bundle_of = np.unique(signature[perm], return_inverse=True)
    _, first = np.unique(bundle_of, return_index=True)
    for bundle in bundle_of[np.sort(first)].tolist():
        members = perm[bundle_of == bundle]
        i = int(members[0])
        slots = [keys[o] for o in order[starts[i] : (starts[i + 1] if i + 1 < len(starts) else len(order))].tolist()]
        status_ok = bool(ok[i])
        reasons: list[str] = []
        for root in roots[members].tolist():
            for reason in blocked.get(root, []) or ([] if status_ok else ["no layer produces these channels"]):
                if reason not in reasons:
                    reasons.append(reason)
        groups.append(Group(len(groups), roots[members].tolist(), slots, status_ok, reasons))
    return ChannelIndex(all_roots, slot_classes, groups, blocked)

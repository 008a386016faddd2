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

    members: dict[int, list[tuple]] = {}
    first_seen: dict[int, int] = {}
    for order, (key, roots) in enumerate(slot_roots.items()):
        unique, first = np.unique(roots, return_index=True)
        for root in unique[np.argsort(first)].tolist():
            members.setdefault(root, []).append(key)
            first_seen.setdefault(root, order)
    producers = {key for key, slot in graph.slots.items() if slot.role == "out"}
    bundles: dict[tuple, list[int]] = {}
    for root in sorted(members, key=lambda r: (first_seen[r], r)):
        keys = tuple(members[root])
        has_producer = any(k in producers for k in keys)
        reasons = blocked.get(root, [])
        status = "ok" if has_producer and not reasons else "blocked"
        bundles.setdefault((keys, status), []).append(root)
    groups = []
    for (keys, status), roots in bundles.items():
        reasons: list[str] = []
        for root in roots:
            for reason in blocked.get(root, []) or (["no layer produces these channels"] if status != "ok" else []):
                if reason not in reasons:
                    reasons.append(reason)
        groups.append(Group(len(groups), roots, list(keys), status == "ok", reasons))
    return ChannelIndex(all_roots, slot_classes, groups, blocked)

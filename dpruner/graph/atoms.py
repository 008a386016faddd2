"""Channel atoms: every channel position of every traced tensor is labelled with an atom id; atoms that must be
removed together are merged with union-find. A merged class of atoms is one prunable *channel* of the network.

Kinds of atom: 'layer' (an output channel of a conv/linear layer), 'input' (a channel of the network input),
'zero' (a constant channel inserted by F.pad) and 'opaque' (the output of an op dpruner does not understand).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class AtomTable:
    """Union-find over atom ids, with a kind per atom and the reasons that make a class unprunable."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.kind: list[str] = []
        self._blocked: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, n: int, kind: str) -> np.ndarray:
        """n fresh atoms of one kind."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self.kind.extend([kind] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            # the smaller id stays the root, so classes are named deterministically by their oldest atom
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self._parent[hi] = lo

    def union_pairwise(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple position i of `a` with position i of `b` (e.g. the two operands of a residual add)."""
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def union_all(self, atoms: np.ndarray) -> None:
        """Merge every atom given into one class (e.g. all channels of one conv group)."""
        flat = atoms.ravel().tolist()
        for x in flat[1:]:
            self.union(flat[0], x)

    def block(self, atoms, reason: str) -> None:
        """Mark the classes of these atoms unprunable, with a reason that names the node."""
        for a in np.asarray(atoms).ravel().tolist():
            self._blocked.setdefault(int(a), []).append(reason)

    def roots(self, atoms: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(a)) for a in atoms.ravel()), dtype=np.int64, count=atoms.size)

    def blocked_reasons(self) -> dict[int, list[str]]:
        """Reasons per class root (deduplicated, in first-seen order)."""
        out: dict[int, list[str]] = {}
        for atom, reasons in self._blocked.items():
            bucket = out.setdefault(self.find(atom), [])
            for reason in reasons:
                if reason not in bucket:
                    bucket.append(reason)
        return out


@dataclass(frozen=True)
class Chan:
    """The channel labelling of one tensor: the axis that carries channels and the atom at each position on it."""

    axis: int
    atoms: np.ndarray

    def __len__(self) -> int:
        return int(self.atoms.shape[0])


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer read by a get_attr node (e.g. ViT's position embedding, a LayerNorm weight)."""

    target: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Opaque:
    """A tensor whose channel layout is unknown (the network input, the output of an op without a rule). Nothing is
    pruned *through* it: a layer that consumes it keeps its input channels, but may still lose output channels."""

    reason: str


@dataclass(frozen=True)
class ShapeOf:
    """`x.shape` / `x.size()` of a tracked tensor. Reading its channel entry turns the channel count into a
    constant the graph cannot follow (e.g. `B, C, H, W = x.shape; y.view(B, C, -1)`), so doing so pins x's
    channels; reading other entries (the batch size) is harmless."""

    chan: Chan
    ndim: int

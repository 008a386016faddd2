"""Channel atoms: every channel position of every traced tensor is labelled with an atom id; atoms that must be
removed together are merged with union-find. A merged class of atoms is one prunable *channel* of the network.

Kinds of atom: 'layer' (an output channel of a conv/linear layer), 'input' (a channel of the network input),
'zero' (a constant channel inserted by F.pad) and 'opaque' (the output of an op dpruner does not understand).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class AtomTable:
    """Atoms, the couplings between them, and the reasons that make a class unprunable.

    Couplings are collected as edges and resolved once into connected components (scipy's connected_components),
    which keeps propagation fast on models with 100k+ channels. The class of an atom is named by its smallest atom
    id, so numbering is deterministic.
    """

    def __init__(self) -> None:
        self._n = 0
        self.kind: list[str] = []
        self._edges_a: list[np.ndarray] = []
        self._edges_b: list[np.ndarray] = []
        self._blocked: dict[int, list[str]] = {}
        self._root: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    def new(self, n: int, kind: str) -> np.ndarray:
        """n fresh atoms of one kind."""
        start = self._n
        self._n += n
        self.kind.extend([kind] * n)
        self._root = None
        return np.arange(start, start + n, dtype=np.int64)

    def union_pairwise(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple position i of `a` with position i of `b` (e.g. the two operands of a residual add)."""
        if len(a):
            self._edges_a.append(np.asarray(a, dtype=np.int64))
            self._edges_b.append(np.asarray(b, dtype=np.int64))
            self._root = None

    def block(self, atoms, reason: str) -> None:
        """Mark the classes of these atoms unprunable, with a reason that names the node."""
        for a in np.asarray(atoms).ravel().tolist():
            self._blocked.setdefault(int(a), []).append(reason)

    def _resolve(self) -> np.ndarray:
        if self._root is None:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            a = np.concatenate(self._edges_a) if self._edges_a else np.zeros(0, np.int64)
            b = np.concatenate(self._edges_b) if self._edges_b else np.zeros(0, np.int64)
            graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self._n, self._n))
            _, labels = connected_components(graph, directed=False)
            smallest = np.full(labels.max() + 1 if self._n else 0, self._n, dtype=np.int64)
            np.minimum.at(smallest, labels, np.arange(self._n, dtype=np.int64))
            self._root = smallest[labels]
        return self._root

    def find(self, a: int) -> int:
        return int(self._resolve()[a])

    def roots(self, atoms: np.ndarray) -> np.ndarray:
        return self._resolve()[np.asarray(atoms, dtype=np.int64)]

    def blocked_reasons(self) -> dict[int, list[str]]:
        """Reasons per class root (deduplicated, in first-seen order)."""
        root = self._resolve()
        out: dict[int, list[str]] = {}
        for atom, reasons in self._blocked.items():
            bucket = out.setdefault(int(root[atom]), [])
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
    """A parameter or buffer read by a get_attr node (e.g. ViT's position embedding, a LayerNorm weight), or a view
    of one that only adds, drops or reorders dims, or an element-wise function of one (`self.gamma.view(1, -1, 1, 1)`,
    `self.gamma[:, None, None]`, `self.scale.float()`): slicing the parameter slices such a value alike.

    shape: the shape of this value; dims: for each of its dims, the parameter's dim it runs along (None for a
    size-1 dim a view inserted), or None when it is the parameter itself."""

    target: str
    shape: tuple[int, ...]
    dims: tuple[int | None, ...] | None = None

    def param_dim(self, d: int) -> int | None:
        """The parameter's dim that dim `d` of this value runs along (None: a size-1 dim added by a view)."""
        return d if self.dims is None else self.dims[d]

    def view(self, shape, dims) -> "ParamRef":
        """This parameter seen through a view: `dims[i]` is the dim of *this value* that new dim i runs along."""
        return ParamRef(self.target, tuple(shape), tuple(None if d is None else self.param_dim(d) for d in dims))


@dataclass(frozen=True)
class Opaque:
    """A tensor whose channel layout is unknown (the network input, the output of an op without a rule). Nothing is
    pruned *through* it: a layer that consumes it keeps its input channels, but may still lose output channels."""

    reason: str


@dataclass(frozen=True)
class ChanCount:
    """The channel count of a tensor, read in the forward (`C` of `B, C, H, W = x.shape`, `x.size(1)`). It follows a
    pruned width where it only sizes the channel dim of a view/reshape/expand of a tensor with as many channels
    (those channels are then coupled); any other use (arithmetic, a comparison, a loop bound) pins the channels."""

    atoms: np.ndarray


@dataclass(frozen=True)
class ShapeOf:
    """`x.shape` / `x.size()` of a tracked tensor. Reading its channel entry turns the channel count into a
    constant the graph cannot follow (e.g. `B, C, H, W = x.shape; y.view(B, C, -1)`), so doing so pins x's
    channels; reading other entries (the batch size) is harmless."""

    chan: Chan
    ndim: int

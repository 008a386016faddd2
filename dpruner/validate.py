"""Range checks for numbers a user gives (options or library arguments): NaN, infinities and absurd magnitudes
become one InputError sentence naming the option, before any work starts."""

from __future__ import annotations

import math

from dpruner.errors import InputError

MAX_EPOCHS = 100_000.0  # beyond this a run would never end on any machine: a typo, not a plan
MAX_SEED = 2**32 - 1  # numpy and scikit-learn accept seeds below 2**32


def number(value, option: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (open ends with low_open/high_open); InputError naming `option`."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{option} must be a number, got {value!r}.") from None
    if not math.isfinite(x):
        raise InputError(f"{option} must be a finite number, got {value!r}.")
    below = low is not None and (x <= low if low_open else x < low)
    above = high is not None and (x >= high if high_open else x > high)
    if below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise InputError(f"{option} must be {' and '.join(p for p in (lo, hi) if p)}, got {value!r}.")
    return x


def epochs(value, option: str) -> float:
    """A positive, finite number of epochs (fractions allowed) below MAX_EPOCHS."""
    return number(value, option, low=0, low_open=True, high=MAX_EPOCHS)


def seed(value, option: str = "--seed") -> int:
    """An integer seed in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{option} must be an integer from 0 to {MAX_SEED}, got {value!r}.")
    return value


def finite_weights(model, what: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf (scores, PCA and MACs would be meaningless)."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise InputError(f"{what} has {count} non-finite values (NaN or inf) in '{name}'; analyze and prune "
                             "need finite weights (was the checkpoint saved after a diverged training step?).")

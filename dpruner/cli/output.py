"""Where output goes: results on stdout (Rich, or exactly one JSON document with --json), everything else on stderr."""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console


WIDTH_WHEN_PIPED = 160  # Rich would wrap at 80 columns when stdout is a file or pipe; tables are wider


def stdout_console() -> Console:
    """Console for human-readable results: the terminal's width, or WIDTH_WHEN_PIPED when redirected."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDTH_WHEN_PIPED)
    return console


def stderr_console() -> Console:
    """Console for progress, notes and warnings (keeps stdout clean for --json)."""
    return Console(stderr=True)


def emit_json(document: dict) -> None:
    """Write one JSON document to stdout (plain text: no Rich markup, no line wrapping). NaN and infinities, which
    JSON cannot express, become null."""
    sys.stdout.write(json.dumps(_finite(document), indent=2, sort_keys=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (K, M, G, T)."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def print_error(message: str) -> None:
    """'error: <message>' on stderr as one unwrapped line (Rich would wrap it at the terminal width)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def opaque_lines(opaque: list[dict], limit: int = 5) -> list[str]:
    """Rich lines for the modules torch.fx could not follow (prune and analyze print the same)."""
    if not opaque:
        return []
    split = [o for o in opaque if not o.get("whole", True)]
    whole = [o for o in opaque if o.get("whole", True)]
    lines = []
    if split:
        lines.append(f"[yellow]torch.fx could not follow the forward of {len(split)} module"
                     f"{'s' if len(split) != 1 else ''}[/yellow]; the blocks inside were traced one by one (their "
                     "inputs and outputs keep their channels):")
        lines += [f"  {o['module'] or '(the model)'}: {o['reason']}" for o in split[:limit]]
    if whole:
        lines.append(f"[yellow]{len(whole)} block{'s' if len(whole) != 1 else ''} torch.fx could not trace "
                     f"{'were' if len(whole) != 1 else 'was'} kept whole[/yellow], e.g.:")
        lines += [f"  {o['module'] or '(the model)'}: {o['reason']}" for o in whole[:limit]]
    return lines

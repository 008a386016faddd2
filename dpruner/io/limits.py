"""Resource limits on what dpruner reads, so a small hostile file or option cannot make it allocate gigabytes.

Defaults suit every model dpruner targets; raise them with the environment variables below when a real input
needs more (values are whole numbers, optionally with a binary K/M/G/T suffix: DPRUNER_MAX_LOAD_BYTES=16G).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from dpruner.errors import InputError

ENV_MAX_LOAD_BYTES = "DPRUNER_MAX_LOAD_BYTES"
ENV_MAX_INPUT_ELEMENTS = "DPRUNER_MAX_INPUT_ELEMENTS"
# How far a zip's entries may inflate beyond the file's own size: torch.save stores entries uncompressed, so a
# real checkpoint never comes near this; a zip bomb does.
ZIP_INFLATE_SLACK_BYTES = 64 << 20

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Limits:
    """The limits in force; build one by hand in library code, or take the environment's with limits_from_env()."""

    max_load_bytes: int = 8 << 30  # 8 GiB: uncompressed size of a checkpoint dpruner will load
    max_input_elements: int = 1 << 26  # N*C*H*W of the example input: 64 Mi elements, 256 MiB as float32


def limits_from_env(environ: Mapping[str, str] | None = None) -> Limits:
    """Limits with DPRUNER_MAX_LOAD_BYTES / DPRUNER_MAX_INPUT_ELEMENTS applied over the defaults."""
    env = os.environ if environ is None else environ
    default = Limits()
    return Limits(
        max_load_bytes=_parse(env, ENV_MAX_LOAD_BYTES, default.max_load_bytes),
        max_input_elements=_parse(env, ENV_MAX_INPUT_ELEMENTS, default.max_input_elements),
    )


def _parse(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    found = re.fullmatch(r"(\d[\d_]*)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
    value = int(found.group(1)) * _SUFFIXES[found.group(2).upper()] if found else 0
    if value <= 0:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InputError(
            f"{name} must be a positive whole number, optionally with a K, M, G or T suffix (e.g. 16G), got '{shown}'."
        )
    return value


def format_bytes(n: int) -> str:
    """'1.5 GiB'-style text for a byte count."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

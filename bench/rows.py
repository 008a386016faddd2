"""What the restartable benchmark scripts share: their results are JSON lines, one per finished row, and a row
already in the file is skipped when the script runs again."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """Every finished row of a results file (none when it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def finished(path: Path, keys: tuple[str, ...]) -> set[tuple]:
    """The rows already measured, as tuples of their `keys` fields (e.g. ("row", "seed"))."""
    return {tuple(r[k] for k in keys) for r in read_rows(path)}


def append_row(path: Path, record: dict) -> None:
    """Add one finished row (stamped with when and where it ran) to the results file."""
    import torch

    import dpruner

    record = {**record, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "dpruner": dpruner.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")

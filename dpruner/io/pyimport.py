"""Import a user's .py file by path: the one place that does it (architectures, data loaders, leaf classes)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from dpruner.usercode import user_code


def import_by_path(path: Path, prefix: str, error: type[Exception], what: str) -> ModuleType:
    """Import `path` once per process. The module name comes from the absolute path, which keeps two different
    model.py files apart in sys.modules; it is registered before running so worker processes can unpickle its
    classes. Failures, a sys.exit() in the file included, raise `error` (a DprunerError subclass) with one sentence
    naming `what` (e.g. 'Architecture file')."""
    path = Path(path)
    resolved = path.resolve()
    name = f"{prefix}_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise error(f"{what} '{path}' cannot be imported as Python.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with user_code(f"Importing {what[:1].lower()}{what[1:]} '{path}'", error=error):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

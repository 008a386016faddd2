"""Keep code that builds models off the network: dpruner never downloads weights (the checkpoint brings them).

While a `no_network(...)` block is active, connections and DNS lookups to non-loopback hosts and torch.hub downloads
raise NetworkBlockedError; an exception leaving the block after such an attempt becomes one ArchError sentence. The
patches are process-wide (other threads are blocked too while a block is active) and are removed when the last
block exits.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from dpruner.errors import ArchError, DprunerError

DEFAULT_HINT = "build the model without pretrained weights, the checkpoint supplies them"


class NetworkBlockedError(ConnectionRefusedError):
    """What a blocked connection, lookup or download raises inside a no_network block."""


class _Block:
    def __init__(self) -> None:
        self.attempts: list[str] = []  # e.g. 'download weights (https://...)', in order


_lock = threading.RLock()
_active: list[_Block] = []
_saved: list[tuple[object, str, object]] = []  # (owner, attribute, original or _MISSING)
_MISSING = object()


@contextmanager
def no_network(what: str, *, hint: str = DEFAULT_HINT, error: type[DprunerError] = ArchError) -> Iterator[None]:
    """`with no_network("Building 'x'"):` -- network use inside fails, and surfaces as `error`:
    "Building 'x' tried to download weights (URL); dpruner never downloads: <hint>."."""
    block = _Block()
    with _lock:
        if not _active:
            _install()
        _active.append(block)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:  # whatever the code made of the refusal (it may have wrapped it), report the attempt
        if block.attempts:
            raise error(f"{what} tried to {block.attempts[0]}; dpruner never downloads: {hint}.") from None
        raise
    finally:
        with _lock:
            _active[:] = [b for b in _active if b is not block]
            if not _active:
                _uninstall()


def _refuse(attempt: str) -> None:
    with _lock:
        for block in _active:
            block.attempts.append(attempt)
    raise NetworkBlockedError(f"dpruner blocks network access while building a model (tried to {attempt})")


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in ("", "localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _patch(owner, name: str, check) -> None:
    """Replace owner.name by a wrapper that runs `check` first while a block is active. The wrapper passes straight
    through otherwise, so a module that imports the name during a block keeps a harmless binding afterwards."""
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        if _active:
            check(*args, **kwargs)
        return original(*args, **kwargs)

    _saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, guarded)


def _check_connect(sock, address, *_args) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and address:
        if not _is_local(address[0]):
            _refuse(f"connect to {address[0]}:{address[1] if len(address) > 1 else '?'}")


def _check_lookup(host=None, *_args, **_kwargs) -> None:
    if not _is_local(host):
        _refuse(f"look up the host {host}")


def _check_download(url=None, *_args, **_kwargs) -> None:
    _refuse(f"download weights ({url})")


# torch.hub prints 'Downloading: ...' to stdout and creates its cache folder before downloading, so its loaders are
# refused before they start; torchvision holds its own reference to torch.hub's loader.
_DOWNLOADERS = (
    ("torch.hub", "download_url_to_file"),
    ("torch.hub", "load_state_dict_from_url"),
    ("torch.utils.model_zoo", "load_url"),
    ("torchvision._internally_replaced_utils", "load_state_dict_from_url"),
    ("torchvision.models._api", "load_state_dict_from_url"),
)


def _install() -> None:
    _patch(socket.socket, "connect", _check_connect)
    _patch(socket.socket, "connect_ex", _check_connect)
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        _patch(socket, name, _check_lookup)
    try:
        import torch.hub  # noqa: F401  (patched below through sys.modules)
    except ImportError:
        pass
    for module_name, attr in _DOWNLOADERS:
        module = sys.modules.get(module_name)
        if module is not None:
            _patch(module, attr, _check_download)


def _uninstall() -> None:
    while _saved:
        owner, name, original = _saved.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)

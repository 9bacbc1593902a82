"""The on-disk caches of what a load measures (the exact region, the tree costs), and file identity.

Each kind of measurement is one JSON table, ``$XDG_CACHE_HOME/medusa-edge/<name>.json`` (else
``~/.cache``), keyed by a hash of everything the measurement depends on. A damaged or unreadable
table counts as empty; a read-only home means measuring again next time, never an error. Writes
replace the file atomically, under one lock per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Callable, Optional

_lock = threading.Lock()


def table_path(name: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "medusa-edge", f"{name}.json")


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256 of the first and last MiB): cheap for multi-GB files; the whole file up to 2 MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (2 << 20):
            f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return size, h.hexdigest()


def cached(name: str, key: str, measure: Callable[[], Any], *, decode: Callable[[Any], Optional[Any]],
           encode: Callable[[Any], Any] = lambda v: v, read: bool = True, store: Callable[[Any], bool] = lambda v: True):
    """(value, whether it came from the table). ``decode(entry)`` gives the value, or None for an entry
    of the wrong shape (a miss); on a miss ``measure()`` runs and ``encode(value)`` is stored when
    ``store(value)``. ``read=False`` measures and stores without looking (a forced remeasure)."""
    path = table_path(name)
    with _lock:
        table: dict = {}
        try:
            with open(path) as f:
                table = json.load(f)
            if not isinstance(table, dict):
                table = {}
            if read and key in table:
                hit = decode(table[key])
                if hit is not None:
                    return hit, True
        except (OSError, ValueError, TypeError, AttributeError):
            table = {}
        value = measure()
        if store(value):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                table[key] = encode(value)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(table, f)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home: measured again next time
        return value, False

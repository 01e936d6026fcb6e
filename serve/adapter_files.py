"""A model replica's disk cache of LoRA files fetched from the registry or a remote run root.

Only the LoRA file is fetched (not the version's whole artifact tree), once per registered version: the
cache is keyed by where the file lives, so a moved alias fetches the new version and an unchanged one
costs nothing. Beyond ``max_bytes`` the least recently used files are deleted; the folder goes with the
replica. A loaded adapter's weights live in the pipeline, so deleting its file never affects a render.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections import Counter, OrderedDict
from pathlib import Path

from safetydpo.model_ids import ModelCatalog


class AdapterFiles:
    """Local LoRA files for LoRA sources, with a byte cap on what is kept.

    A file is pinned from :meth:`acquire` to :meth:`release` (while the adapter loads), so trimming the
    cache for one load never deletes the file another load is about to read. Fetches run one at a time
    per replica (a LoRA file is megabytes; renders do not wait on them).
    """

    def __init__(self, catalog: ModelCatalog, max_bytes: int) -> None:
        self.catalog, self.max_bytes = catalog, max_bytes
        self.root = tempfile.mkdtemp(prefix="safetydpo-adapters-")
        self.files: OrderedDict[str, int] = OrderedDict()  # local file -> bytes, least recently used first
        self.pins: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._remove = weakref.finalize(self, shutil.rmtree, self.root, True)  # the folder goes with the replica

    def acquire(self, source: str) -> str:
        """A local file for ``source``, pinned until :meth:`release` (a local LoRA file is used in place)."""
        with self.lock:  # fetch and pin in one step: a release in between would find the file unpinned
            local = self.catalog.local_lora(source, self.root)
            if local.startswith(self.root):
                self.files[local] = Path(local).stat().st_size
                self.files.move_to_end(local)
                self.pins[local] += 1
        return local

    def release(self, local: str) -> None:
        """Unpin ``local`` and delete the least recently used unpinned files beyond the byte cap."""
        with self.lock:
            if local not in self.pins:
                return
            self.pins[local] -= 1
            if self.pins[local] <= 0:
                del self.pins[local]
            total = sum(self.files.values())
            for path in [p for p in self.files if p not in self.pins]:
                if total <= self.max_bytes:
                    break
                total -= self.files.pop(path)
                shutil.rmtree(Path(path).parent, ignore_errors=True)

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in Path(self.root).rglob("*") if f.is_file())

    def close(self) -> None:
        self._remove()

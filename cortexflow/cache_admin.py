"""Listing and clearing CortexFlow's disk caches: the FP8 weight cache (:mod:`cortexflow.quantization.fp8_cache`)
and the ONNX export cache (:mod:`cortexflow.onnx.cache`); behind ``cortexflow cache``.

Neither cache evicts entries itself. Both keep one folder ``{root}/{key}`` per entry with a ``manifest.json``
(FP8: ``layers.safetensors``; ONNX: the ``.onnx`` files) and write it into a hidden staging folder
``{root}/.{key}-XXXX`` that is renamed into place when complete, so a hidden folder left behind is an interrupted
write. Manifests are read as plain JSON: this module needs neither triton nor the onnx packages.

An entry's ``last_used`` is the newest access or modification time of its files, except the access time of its
``manifest.json`` (which listing reads). Access times are only as good as the file system keeps them (``relatime``:
at most once a day; ``noatime``: never, and ``last_used`` is then the time the entry was written).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from cortexflow.errors import InputError

#: The caches, in the order they are listed.
KINDS = ("fp8", "onnx")
MANIFEST = "manifest.json"
#: An incomplete entry (a staging folder, or a folder without a manifest) is selected for removal only when none of
#: its files changed for this long: until then another process may still be writing it.
STAGING_GRACE_S = 3600.0
DAY_S = 86400.0


@dataclass(frozen=True)
class CacheEntry:
    """One folder of a cache: its ``kind`` ("fp8" or "onnx"), ``folder``, total ``bytes`` of its files, ``created``
    (unix time: the manifest's "created" when present and parseable, else the folder's mtime), ``last_used`` (the
    newest atime / mtime of its files, the manifest's mtime only, or the folder's mtime when it holds no file), the
    ``checkpoint`` its manifest names (None when it names none), and whether it is ``complete`` (False for a staging
    folder or a folder without a manifest)."""

    kind: str
    folder: Path
    bytes: int
    created: float
    last_used: float
    checkpoint: str | None
    complete: bool

    @property
    def key(self) -> str:
        """The folder's name: the cache key, or ``.{key}-XXXX`` for a staging folder."""
        return self.folder.name

    def to_dict(self) -> dict:
        """The entry as JSON-able values, times as ISO 8601 UTC."""
        return {
            "kind": self.kind, "key": self.key, "folder": str(self.folder), "bytes": self.bytes,
            "created": _iso(self.created), "last_used": _iso(self.last_used), "checkpoint": self.checkpoint,
            "complete": self.complete,
        }


def cache_roots(fp8_dir: "str | Path | None" = None, onnx_dir: "str | Path | None" = None) -> dict[str, Path]:
    """The root folder of each cache: the folder given, else the one the cache itself uses by default (FP8:
    ``$CORTEXFLOW_CACHE/fp8``, ...; ONNX: ``$CORTEXFLOW_ONNX_CACHE``, else ``$CORTEXFLOW_CACHE/onnx``, ...)."""
    # The FP8 root is what fp8_cache.default_cache_dir() returns; that module imports the triton backend, so the
    # function it calls is called here instead.
    from cortexflow.onnx.cache import default_cache_dir as onnx_default
    from cortexflow.onnx.hashing import cache_root

    return {
        "fp8": Path(fp8_dir).expanduser() if fp8_dir is not None else cache_root("fp8"),
        "onnx": Path(onnx_dir).expanduser() if onnx_dir is not None else onnx_default(),
    }


def list_entries(roots: Mapping[str, Path]) -> list[CacheEntry]:
    """Every entry folder directly under each root (``{kind: root}``; a missing root holds none), sorted by kind
    (:data:`KINDS` order) then by ``last_used``, least recently used first. Symbolic links and plain files in a
    root are not entries and are skipped."""
    entries = []
    for kind, root in roots.items():
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in root.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                try:
                    entries.append(_entry(kind, folder))
                except FileNotFoundError:  # a staging folder renamed into place, or an entry removed, meanwhile
                    continue
    order = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(entries, key=lambda e: (order.get(e.kind, len(order)), e.kind, e.last_used, e.key))


def select(
    entries: Iterable[CacheEntry],
    *,
    kind: str = "all",
    older_than_days: float | None = None,
    keep_bytes: int | None = None,
    now: float | None = None,
) -> list[CacheEntry]:
    """The entries of ``kind`` ("all", "fp8" or "onnx") to remove, in ``entries``' order.

    A complete entry is selected when it was not used for ``older_than_days``, or when it is among the least
    recently used ones beyond the budget ``keep_bytes``: entries are taken from the least recently used on until the
    complete entries left total at most ``keep_bytes`` (one budget over every cache ``kind`` names). With neither
    criterion every complete entry of ``kind`` is selected. An incomplete entry (an interrupted write) is selected
    when none of its files was used for :data:`STAGING_GRACE_S`, whatever the criteria, and never before; it does not
    count towards the budget. ``now``: the unix time to measure ages from (default: the current time)."""
    kinds = _kinds(kind)
    if older_than_days is not None and older_than_days < 0:
        raise InputError(f"older_than_days must be 0 or more, got {older_than_days}")
    if keep_bytes is not None and keep_bytes < 0:
        raise InputError(f"keep_bytes must be 0 or more, got {keep_bytes}")
    now = time.time() if now is None else now
    entries = [e for e in entries if e.kind in kinds]
    chosen: set[Path] = {e.folder for e in entries if not e.complete and now - e.last_used > STAGING_GRACE_S}
    complete = sorted((e for e in entries if e.complete), key=lambda e: e.last_used)
    if older_than_days is None and keep_bytes is None:
        chosen.update(e.folder for e in complete)
    if older_than_days is not None:
        chosen.update(e.folder for e in complete if now - e.last_used > older_than_days * DAY_S)
    if keep_bytes is not None:
        total = sum(e.bytes for e in complete)
        for entry in complete:  # least recently used first
            if total <= keep_bytes:
                break
            chosen.add(entry.folder)
            total -= entry.bytes
    return [e for e in entries if e.folder in chosen]


def remove_entries(entries: Iterable[CacheEntry], roots: Mapping[str, Path]) -> int:
    """Remove the entries' folders and return the bytes they held. Every folder must lie directly in the root of
    its kind in ``roots``; otherwise nothing is removed (:class:`~cortexflow.errors.InputError`). A folder that is
    already gone (a staging folder renamed into place meanwhile) counts 0 bytes."""
    entries = list(entries)
    resolved = {kind: Path(root).resolve() for kind, root in roots.items()}
    for entry in entries:
        root = resolved.get(entry.kind)
        if root is None or entry.folder.is_symlink() or entry.folder.resolve().parent != root:
            raise InputError(f"{entry.folder} is not an entry of the {entry.kind} cache "
                             f"{roots.get(entry.kind, '(no such cache)')}; nothing was removed")
    freed = 0
    for entry in entries:
        try:
            shutil.rmtree(entry.folder)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise InputError(f"cannot remove the {entry.kind} cache entry {entry.folder}: {err}; "
                             f"{freed} bytes were freed before it") from err
        freed += entry.bytes
    return freed


def _entry(kind: str, folder: Path) -> CacheEntry:
    """The :class:`CacheEntry` of one folder of the ``kind`` cache."""
    folder_mtime = folder.stat().st_mtime
    nbytes, newest = 0, None
    for directory, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:  # removed meanwhile
                continue
            nbytes += st.st_size
            # reading a manifest (this listing does) is no use of the entry: only its modification counts
            used = st.st_mtime if name == MANIFEST and directory == str(folder) else max(st.st_atime, st.st_mtime)
            newest = max(newest or 0.0, used)
    manifest = _read_manifest(folder) if not folder.name.startswith(".") else None
    created = _parse_time(manifest.get("created")) if manifest else None
    return CacheEntry(
        kind=kind, folder=folder, bytes=nbytes,
        created=folder_mtime if created is None else created,
        last_used=folder_mtime if newest is None else newest,
        checkpoint=_checkpoint(manifest) if manifest else None,
        complete=manifest is not None,
    )


def _read_manifest(folder: Path) -> dict | None:
    """The folder's manifest.json as a dict; None when missing or unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _checkpoint(manifest: dict) -> str | None:
    """The checkpoint a manifest names: FP8's "checkpoint", ONNX's "source"."checkpoint" (absent for a bundle the
    ONNX backend exported from weights in memory)."""
    source = manifest.get("source")
    value = manifest.get("checkpoint") or (source.get("checkpoint") if isinstance(source, dict) else None)
    return str(value) if value else None


def _parse_time(value: object) -> float | None:
    """Unix time of a manifest's "created" (ISO 8601 text, naive meaning UTC, or a number); None if unparseable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _kinds(kind: str) -> tuple[str, ...]:
    """``kind`` as the tuple of caches it names."""
    if kind == "all":
        return KINDS
    if kind in KINDS:
        return (kind,)
    raise InputError(f"kind {kind!r} is not a cache: expected all, {', '.join(KINDS)}")

"""Checkpoint names that are not local paths: Hugging Face hub ids, read from huggingface_hub's local cache.

``lerobot/pi0`` names a repository on the Hugging Face hub. CortexFlow downloads nothing at run time: a hub
id resolves to the snapshot that huggingface_hub's cache already holds (``hf download lerobot/pi0`` puts it
there; ``HF_HUB_CACHE`` / ``HF_HOME`` say where the cache is), read with ``local_files_only``, so it works
the same with ``HF_HUB_OFFLINE=1``. Needs the ``hub`` extra (``huggingface_hub``).
"""

from __future__ import annotations

import re
from pathlib import Path

from cortexflow.errors import CheckpointError

HUB_INSTALL_HINT = "pip install \"cortexflow[hub]\""
#: ``owner/name`` (optionally ``@revision``): one slash, no leading ``.``, ``/`` or ``~``.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub repository id (``owner/name`` or ``owner/name@revision``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_checkpoint_path(path: str | Path) -> Path:
    """``path`` itself when it exists or cannot be a hub id; else the cached snapshot folder of that hub id.

    Raises ``CheckpointError`` saying what to do when neither a local path nor a cached hub repository
    is found."""
    local = Path(path).expanduser()
    name = str(path)
    if local.exists() or not looks_like_hub_id(name):
        if not local.exists():
            raise CheckpointError(f"checkpoint path {name!r} does not exist")
        return local
    match = _HUB_ID.match(name)
    repo, revision = match.group("repo"), match.group("revision")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"checkpoint path {name!r} does not exist here; as a Hugging Face hub id it is read from "
            f"huggingface_hub's local cache, which needs {HUB_INSTALL_HINT}; then fetch it with `hf download {repo}`"
        ) from None
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"checkpoint path {name!r} does not exist here, and the Hugging Face hub repository {repo!r} "
            f"{'at ' + revision + ' ' if revision else ''}is not in huggingface_hub's local cache; CortexFlow "
            f"downloads nothing itself: fetch it with `hf download {repo}` (or pass a local folder)"
        ) from None

"""``cortexflow cache``: list CortexFlow's disk caches (FP8 weights, ONNX exports), or clear entries of them by age
or by a size budget (:mod:`cortexflow.cache_admin`)."""

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from cortexflow.cli.common import cli_errors, human_bytes, stdout_console
from cortexflow.errors import InputError

#: ``--keep`` counts decimal gigabytes.
GB = 10**9
KIND_CHOICES = ("all", "fp8", "onnx")


@cli_errors
def cache_command(
    kind: Annotated[str, typer.Option("--kind", metavar="all|fp8|onnx", help="Which cache: all, fp8 (FP8 weight cache) or onnx (ONNX export cache).")] = "all",
    clear: Annotated[bool, typer.Option("--clear", help="Remove the selected entries (without --older-than / --keep: every entry of --kind). Without --clear nothing is removed.")] = False,
    older_than: Annotated[Optional[float], typer.Option("--older-than", metavar="DAYS", help="Select the entries not used for DAYS days.")] = None,
    keep: Annotated[Optional[float], typer.Option("--keep", metavar="GB", help="Select the least recently used entries beyond a budget: keep at most GB gigabytes (10^9 bytes) of --kind.")] = None,
    fp8_dir: Annotated[Optional[Path], typer.Option("--fp8-dir", metavar="DIR", help="Root of the FP8 weight cache (default: $CORTEXFLOW_CACHE/fp8, else $XDG_CACHE_HOME/cortexflow/fp8, else ~/.cache/cortexflow/fp8).")] = None,
    onnx_dir: Annotated[Optional[Path], typer.Option("--onnx-dir", metavar="DIR", help="Root of the ONNX export cache (default: $CORTEXFLOW_ONNX_CACHE, else $CORTEXFLOW_CACHE/onnx, else ~/.cache/cortexflow/onnx).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (roots, entries, what was or would be removed) instead of tables.")] = False,
) -> None:
    """List the entries of CortexFlow's disk caches: kind, key, size, creation, last use and checkpoint, with
    totals. Neither cache evicts entries by itself (an OpenVLA-7B FP8 entry is about 6 GiB).

    --older-than and --keep select entries (both: either selects); without --clear the listing marks them, with
    --clear they are removed. A hidden folder is an interrupted write: it is removed by --clear once none of its
    files was used for an hour (another process may still be writing it), whatever --older-than / --keep say.
    """
    from cortexflow.cache_admin import cache_roots, list_entries, remove_entries, select

    if kind not in KIND_CHOICES:
        raise InputError(f"--kind {kind!r}: expected one of {', '.join(KIND_CHOICES)}")
    if older_than is not None and not older_than >= 0:
        raise InputError(f"--older-than {older_than:g}: expected a number of days, 0 or more")
    if keep is not None and not keep >= 0:
        raise InputError(f"--keep {keep:g}: expected a number of gigabytes, 0 or more")
    roots = cache_roots(fp8_dir, onnx_dir)
    if kind != "all":
        roots = {kind: roots[kind]}
    entries = list_entries(roots)
    criteria = older_than is not None or keep is not None
    selected = select(entries, kind=kind, older_than_days=older_than, keep_bytes=None if keep is None else int(keep * GB),
                      now=time.time()) if clear or criteria else []
    freed = remove_entries(selected, roots) if clear else 0

    if json_output:
        chosen = {e.folder for e in selected}
        typer.echo(json.dumps({
            "roots": {k: str(root) for k, root in roots.items()},
            "entries": [{**e.to_dict(), "selected": e.folder in chosen} for e in entries],
            "cleared": clear,
            "bytes_freed": freed,
        }, indent=2))
        return
    out = stdout_console()
    if clear:
        _print_cleared(out, selected, freed)
        return
    _print_listing(out, roots, entries, selected if criteria else None)


def _print_listing(out, roots: dict, entries: list, selected: Optional[list]) -> None:
    """The roots, a table of the entries (with a column marking ``selected`` ones unless it is None) and totals."""
    for kind, root in roots.items():
        out.print(Text(f"{kind} cache: {root}" + ("" if root.is_dir() else " (does not exist)"), style="dim"))
    if not entries:
        out.print("nothing cached")
        return
    chosen = {e.folder for e in selected or []}
    table = Table(box=box.SIMPLE, pad_edge=False)
    for column in ("kind", "key", "size", "created", "last used", "checkpoint"):
        table.add_column(column, justify="right" if column == "size" else "left", no_wrap=column != "checkpoint")
    if selected is not None:
        table.add_column("--clear removes")
    for e in entries:
        key = e.key if e.complete else f"{e.key} (incomplete)"
        row = [e.kind, key, human_bytes(e.bytes), _local(e.created), _local(e.last_used), e.checkpoint or ""]
        table.add_row(*row, *(["yes" if e.folder in chosen else ""] if selected is not None else []))
    out.print(table)
    for kind in roots:
        of_kind = [e for e in entries if e.kind == kind]
        if of_kind:
            out.print(f"{kind}: {_entries(len(of_kind))}, {human_bytes(sum(e.bytes for e in of_kind))}")
    out.print(f"total: {_entries(len(entries))}, {human_bytes(sum(e.bytes for e in entries))}")
    if selected is not None:
        out.print(f"--clear would remove {_entries(len(selected))}, {human_bytes(sum(e.bytes for e in selected))}")


def _print_cleared(out, removed: list, freed: int) -> None:
    """One line per removed entry, then the bytes freed."""
    if not removed:
        out.print("nothing to remove")
        return
    for e in removed:
        out.print(f"removed {e.kind} {e.key} ({human_bytes(e.bytes)})")
    out.print(f"freed {human_bytes(freed)} ({_entries(len(removed))})")


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

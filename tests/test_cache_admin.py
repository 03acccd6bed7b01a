"""Listing and clearing the disk caches (:mod:`cortexflow.cache_admin`, ``cortexflow cache``).

Fake caches in ``tmp_path`` in the real layouts: FP8 entries (``layers.safetensors`` written with safetensors and a
manifest with the keys ``Fp8LayerCache.save`` writes), ONNX entries (``.onnx`` files and a bundle manifest), and
hidden staging folders, old and new. File times are set, so ages and the least-recently-used order are known.
Covered: listing (sizes, kinds, checkpoints, creation times), missing roots, selection by age / size budget / kind,
the staging folders' grace hour, removal (bytes freed, others left, nothing outside the roots), the default roots,
the command's listing, JSON, ``--clear --older-than``, ``--keep`` and its errors; and one entry written by
``Fp8LayerCache.save`` itself.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cortexflow.cache_admin import DAY_S, CacheEntry, cache_roots, list_entries, remove_entries, select
from cortexflow.cli import app
from cortexflow.errors import InputError

runner = CliRunner()
NOW = time.time()
HOUR = 3600.0


def _set_times(folder: Path, when: float) -> None:
    """Access and modification times of the folder and everything in it."""
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (when, when))


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def fp8_entry(root: Path, key: str, *, rows: int, checkpoint: str, used_days_ago: float, created_days_ago: float = 40):
    """An FP8 entry as ``Fp8LayerCache.save`` lays it out; ``rows`` x 256 E4M3 bytes of projection data."""
    folder = root / key
    folder.mkdir(parents=True)
    tensors = {"llm.layers.0.qkv": torch.zeros(rows, 256, dtype=torch.float8_e4m3fn),
               "llm.layers.0.qkv.fp8_scale": torch.ones(rows, dtype=torch.float32)}
    save_file(tensors, str(folder / "layers.safetensors"), metadata={"format": "pt"})
    manifest = {
        "what": "FP8 (E4M3) language-model layers of a token VLA as the triton backend prepares them",
        "format": 1,
        "checkpoint": checkpoint,
        "checkpoint_hash": "ab" * 32,
        "checkpoint_hash_method": "sha256(...)",
        "key": key,
        "key_parts": {"format": 1, "checkpoint_hash": "ab" * 32, "dtype": "bfloat16", "fp8_stages": ["decoder"]},
        "layers": ["llm.layers.0"],
        "tensors": len(tensors),
        "bytes": rows * 256 + rows * 4,
        "created": _utc(NOW - created_days_ago * DAY_S),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _set_times(folder, NOW - used_days_ago * DAY_S)
    return folder


def onnx_entry(root: Path, key: str, *, nbytes: int, used_days_ago: float, checkpoint: str | None = None):
    """An ONNX export bundle as the export cache lays it out: ``vision.onnx`` of ``nbytes`` and a manifest."""
    folder = root / key
    folder.mkdir(parents=True)
    (folder / "vision.onnx").write_bytes(b"\0" * nbytes)
    created = datetime.datetime.fromtimestamp(NOW - 50 * DAY_S, datetime.timezone.utc).isoformat(timespec="seconds")
    source = {"cache_key": key, **({"checkpoint": checkpoint} if checkpoint else {})}
    manifest = {"format": "cortexflow-onnx/1", "created": created, "model": "pi0", "num_views": 2, "chunk_size": 5,
                "source": source, "stages": {"vision": {"file": "vision.onnx", "bytes": nbytes}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _set_times(folder, NOW - used_days_ago * DAY_S)
    return folder


def staging(root: Path, name: str, *, nbytes: int, used_hours_ago: float) -> Path:
    """A hidden staging folder with one partly written file (an interrupted, or an ongoing, write)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "layers.safetensors").write_bytes(b"\1" * nbytes)
    _set_times(folder, NOW - used_hours_ago * HOUR)
    return folder


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def caches(tmp_path):
    """Two roots: fp8 {old (60 days), recent (2 days), interrupted write (3 h), ongoing write (now)} and
    onnx {old (45 days), recent (1 day)}."""
    roots = {"fp8": tmp_path / "fp8", "onnx": tmp_path / "onnx"}
    folders = {
        "fp8_old": fp8_entry(roots["fp8"], "a" * 24, rows=64, checkpoint="/ckpt/openvla-7b", used_days_ago=60),
        "fp8_recent": fp8_entry(roots["fp8"], "b" * 24, rows=32, checkpoint="/ckpt/rt2", used_days_ago=2),
        "fp8_interrupted": staging(roots["fp8"], ".cccc-x1y2", nbytes=500, used_hours_ago=3),
        "fp8_writing": staging(roots["fp8"], ".dddd-z3w4", nbytes=700, used_hours_ago=0),
        "onnx_old": onnx_entry(roots["onnx"], "e" * 24, nbytes=3000, used_days_ago=45, checkpoint="/ckpt/pi0"),
        "onnx_recent": onnx_entry(roots["onnx"], "f" * 24, nbytes=1000, used_days_ago=1),
    }
    return roots, folders


def by_folder(entries: list[CacheEntry]) -> dict[Path, CacheEntry]:
    return {e.folder: e for e in entries}


def names(entries, folders) -> set[str]:
    chosen = {e.folder for e in entries}
    return {name for name, folder in folders.items() if folder in chosen}


def test_listing_reads_sizes_kinds_checkpoints_and_times(caches):
    roots, folders = caches
    entries = list_entries(roots)
    assert [e.kind for e in entries] == ["fp8"] * 4 + ["onnx"] * 2
    assert [e.folder for e in entries] == [folders[n] for n in
                                           ("fp8_old", "fp8_recent", "fp8_interrupted", "fp8_writing", "onnx_old",
                                            "onnx_recent")], "by kind, then least recently used first"
    found = by_folder(entries)
    for folder in folders.values():
        assert found[folder].bytes == size(folder)
    old = found[folders["fp8_old"]]
    assert old.bytes > 64 * 256 and old.complete and old.checkpoint == "/ckpt/openvla-7b"
    assert old.created == pytest.approx(NOW - 40 * DAY_S, abs=1.5)  # the manifest's, not the folder's
    assert old.last_used == pytest.approx(NOW - 60 * DAY_S, abs=1e-3)
    assert found[folders["onnx_old"]].checkpoint == "/ckpt/pi0"
    assert found[folders["onnx_old"]].created == pytest.approx(NOW - 50 * DAY_S, abs=1.5)
    assert found[folders["onnx_recent"]].checkpoint is None  # a bundle exported from weights in memory
    writing = found[folders["fp8_writing"]]
    assert not writing.complete and writing.checkpoint is None and writing.key == ".dddd-z3w4"
    assert writing.created == pytest.approx(NOW, abs=1.5)  # no manifest: the folder's mtime


def test_reading_a_manifest_is_no_use_of_the_entry(caches):
    """Listing reads every manifest.json: its access time must not make the entry recent."""
    roots, folders = caches
    manifest = folders["fp8_old"] / "manifest.json"
    os.utime(manifest, (NOW, manifest.stat().st_mtime))
    (old,) = [e for e in list_entries(roots) if e.folder == folders["fp8_old"]]
    assert old.last_used == pytest.approx(NOW - 60 * DAY_S, abs=1e-3)
    layers = folders["fp8_old"] / "layers.safetensors"
    os.utime(layers, (NOW - DAY_S, layers.stat().st_mtime))  # the FP8 cache read the layers yesterday
    (old,) = [e for e in list_entries(roots) if e.folder == folders["fp8_old"]]
    assert old.last_used == pytest.approx(NOW - DAY_S, abs=1e-3)


def test_missing_roots_and_stray_files_hold_no_entries(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "stray.txt").write_text("not an entry")
    assert list_entries({"fp8": tmp_path / "nothing", "onnx": tmp_path / "onnx"}) == []


def test_a_folder_without_manifest_is_incomplete_and_a_broken_manifest_gives_folder_times(tmp_path):
    root = tmp_path / "onnx"
    (root / "nomanifest").mkdir(parents=True)
    broken = onnx_entry(root, "g" * 24, nbytes=10, used_days_ago=3)
    (broken / "manifest.json").write_text(json.dumps({"format": "cortexflow-onnx/1", "created": "yesterday"}))
    os.utime(broken, (NOW - 3 * DAY_S,) * 2)
    found = {e.key: e for e in list_entries({"onnx": root})}
    assert not found["nomanifest"].complete
    assert found["g" * 24].complete and found["g" * 24].created == pytest.approx(NOW - 3 * DAY_S, abs=1e-3)


def test_select_by_age(caches):
    roots, folders = caches
    entries = list_entries(roots)
    assert names(select(entries, older_than_days=30, now=NOW), folders) == {"fp8_old", "onnx_old", "fp8_interrupted"}
    assert names(select(entries, older_than_days=50, now=NOW), folders) == {"fp8_old", "fp8_interrupted"}
    assert names(select(entries, older_than_days=0, now=NOW), folders) == set(folders) - {"fp8_writing"}


def test_select_by_lru_budget(caches):
    roots, folders = caches
    entries = list_entries(roots)
    sizes = {name: size(folder) for name, folder in folders.items()}
    # onnx alone: keep the 1 day old bundle, drop the 45 day old one
    assert names(select(entries, kind="onnx", keep_bytes=sizes["onnx_recent"], now=NOW), folders) == {"onnx_old"}
    assert names(select(entries, kind="onnx", keep_bytes=sizes["onnx_recent"] - 1, now=NOW), folders) == {
        "onnx_old", "onnx_recent"}
    # all: LRU order fp8_old (60 d), onnx_old (45 d), fp8_recent (2 d), onnx_recent (1 d); staging not counted
    budget = sizes["fp8_recent"] + sizes["onnx_recent"]
    assert names(select(entries, keep_bytes=budget, now=NOW), folders) == {"fp8_old", "onnx_old", "fp8_interrupted"}
    assert names(select(entries, keep_bytes=budget + sizes["onnx_old"], now=NOW), folders) == {
        "fp8_old", "fp8_interrupted"}
    everything = sum(sizes.values())
    assert names(select(entries, keep_bytes=everything, now=NOW), folders) == {"fp8_interrupted"}
    # both criteria: either selects
    assert names(select(entries, keep_bytes=everything, older_than_days=50, now=NOW), folders) == {
        "fp8_old", "fp8_interrupted"}


def test_select_by_kind_and_without_criteria(caches):
    roots, folders = caches
    entries = list_entries(roots)
    assert names(select(entries, kind="fp8", now=NOW), folders) == {"fp8_old", "fp8_recent", "fp8_interrupted"}
    assert names(select(entries, kind="onnx", now=NOW), folders) == {"onnx_old", "onnx_recent"}
    assert names(select(entries, kind="onnx", older_than_days=30, now=NOW), folders) == {"onnx_old"}
    with pytest.raises(InputError, match="'tensorrt'"):
        select(entries, kind="tensorrt")


def test_staging_folders_are_selected_only_after_an_hour(caches):
    roots, folders = caches
    entries = list_entries(roots)
    assert "fp8_writing" not in names(select(entries, older_than_days=0, keep_bytes=0, now=NOW), folders)
    assert "fp8_writing" in names(select(entries, now=NOW + 1.1 * HOUR), folders)
    assert "fp8_interrupted" not in names(select(entries, now=NOW - 2.5 * HOUR), folders)


def test_removal_frees_the_selected_bytes_and_leaves_the_rest(caches):
    roots, folders = caches
    selected = select(list_entries(roots), older_than_days=30, now=NOW)
    expected = sum(size(e.folder) for e in selected)
    assert remove_entries(selected, roots) == expected
    left = {e.folder for e in list_entries(roots)}
    assert left == {folders[n] for n in ("fp8_recent", "fp8_writing", "onnx_recent")}
    assert remove_entries(selected, roots) == 0  # already gone


def test_removal_never_touches_a_folder_outside_the_roots(caches, tmp_path):
    roots, folders = caches
    outside = fp8_entry(tmp_path / "elsewhere", "h" * 24, rows=8, checkpoint="x", used_days_ago=90)
    nested = fp8_entry(folders["fp8_recent"], "inner", rows=8, checkpoint="x", used_days_ago=90)
    entries = list_entries(roots)
    for stray in (outside, nested, roots["fp8"], folders["onnx_old"]):  # onnx_old posing as an fp8 entry
        bad = CacheEntry("fp8", stray, 1, 0.0, 0.0, None, True)
        with pytest.raises(InputError, match="not an entry of the fp8 cache"):
            remove_entries([*entries, bad], roots)
    link = roots["fp8"] / ("i" * 24)
    link.symlink_to(outside, target_is_directory=True)
    assert link not in {e.folder for e in list_entries(roots)}
    with pytest.raises(InputError, match="not an entry"):
        remove_entries([CacheEntry("fp8", link, 1, 0.0, 0.0, None, True)], roots)
    assert all(folder.is_dir() for folder in (*folders.values(), outside, nested))


def test_default_roots_follow_the_caches_own(monkeypatch, tmp_path):
    monkeypatch.setenv("CORTEXFLOW_CACHE", str(tmp_path / "base"))
    monkeypatch.delenv("CORTEXFLOW_ONNX_CACHE", raising=False)
    assert cache_roots() == {"fp8": tmp_path / "base" / "fp8", "onnx": tmp_path / "base" / "onnx"}
    monkeypatch.setenv("CORTEXFLOW_ONNX_CACHE", str(tmp_path / "exports"))
    assert cache_roots()["onnx"] == tmp_path / "exports"
    assert cache_roots(tmp_path / "f", tmp_path / "o") == {"fp8": tmp_path / "f", "onnx": tmp_path / "o"}


def invoke(roots, *args):
    return runner.invoke(app, ["cache", "--fp8-dir", str(roots["fp8"]), "--onnx-dir", str(roots["onnx"]),
                               *map(str, args)])


def test_cli_lists_entries_and_totals(caches):
    roots, folders = caches
    result = invoke(roots)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for name in ("a" * 24, "b" * 24, ".cccc-x1y2 (incomplete)", "e" * 24, "/ckpt/openvla-7b", "/ckpt/pi0",
                 "fp8: 4 entries", "onnx: 2 entries", "total: 6 entries", "last used", str(roots["fp8"])):
        assert name in text, name
    assert "--clear" not in text  # no criteria: nothing marked
    assert all(folder.is_dir() for folder in folders.values())

    empty = runner.invoke(app, ["cache", "--fp8-dir", str(roots["fp8"] / "none"), "--kind", "fp8"])
    assert empty.exit_code == 0 and "nothing cached" in empty.stdout and "does not exist" in empty.stdout


def test_cli_marks_what_clear_would_remove(caches):
    roots, folders = caches
    for _ in range(2):  # the first listing read the manifests: the second selects the same
        result = invoke(roots, "--older-than", 30)
        assert result.exit_code == 0, result.output
        assert "--clear would remove 3 entries" in result.stdout
    assert all(folder.is_dir() for folder in folders.values())


def test_cli_json(caches):
    roots, folders = caches
    result = invoke(roots, "--json", "--kind", "onnx", "--older-than", 30)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["roots"] == {"onnx": str(roots["onnx"])} and not report["cleared"] and report["bytes_freed"] == 0
    rows = {row["key"]: row for row in report["entries"]}
    assert set(rows) == {"e" * 24, "f" * 24}
    assert rows["e" * 24]["selected"] and not rows["f" * 24]["selected"]
    assert rows["e" * 24]["bytes"] == size(folders["onnx_old"]) and rows["e" * 24]["checkpoint"] == "/ckpt/pi0"
    assert rows["e" * 24]["created"].startswith(time.strftime("%Y-%m-%d", time.gmtime(NOW - 50 * DAY_S)))


def test_cli_clear_older_than(caches):
    roots, folders = caches
    expected = sum(size(folders[n]) for n in ("fp8_old", "onnx_old", "fp8_interrupted"))
    result = invoke(roots, "--clear", "--older-than", 30, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes_freed"] == expected
    assert {n for n, f in folders.items() if f.is_dir()} == {"fp8_recent", "fp8_writing", "onnx_recent"}


def test_cli_clear_keep_and_clear_all_of_a_kind(caches):
    roots, folders = caches
    result = invoke(roots, "--clear", "--keep", 0.000005)  # 5 kB: only the most recent bundle (~1.3 kB) fits
    assert result.exit_code == 0, result.output
    assert "removed fp8 " + "a" * 24 in result.stdout and "freed" in result.stdout
    assert {n for n, f in folders.items() if f.is_dir()} == {"fp8_writing", "onnx_recent"}
    result = invoke(roots, "--clear", "--kind", "onnx")
    assert result.exit_code == 0, result.output
    assert {n for n, f in folders.items() if f.is_dir()} == {"fp8_writing"}
    assert "nothing to remove" in invoke(roots, "--clear").stdout


@pytest.mark.parametrize("args, option", [(["--older-than", "-1"], "--older-than"), (["--keep", "-2"], "--keep"),
                                          (["--kind", "tensorrt"], "--kind")])
def test_cli_refuses_bad_values_naming_the_option(caches, args, option):
    roots, folders = caches
    result = invoke(roots, "--clear", *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and option in errors[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert all(folder.is_dir() for folder in folders.values())


def test_an_entry_written_by_the_fp8_cache_is_listed(tmp_path):
    pytest.importorskip("triton")
    from cortexflow.quantization.fp8_cache import Fp8LayerCache

    folder = tmp_path / "fp8" / ("k" * 24)
    cache = Fp8LayerCache(folder=folder, key_parts={"format": 1, "checkpoint_hash": "cd" * 32}, layers=(),
                          stored={"llm.layers.0.qkv": ((4, 8), None)}, checkpoint_names=frozenset())
    cache.save({"llm.layers.0.qkv": torch.ones(4, 8)}, checkpoint="/ckpt/tiny")
    (entry,) = list_entries({"fp8": tmp_path / "fp8"})
    assert entry.complete and entry.checkpoint == "/ckpt/tiny" and entry.bytes == size(folder)
    assert entry.created == pytest.approx(time.time(), abs=5)

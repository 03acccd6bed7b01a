"""Checkpoint names a new user tries: Hugging Face hub ids (read from a local cache) and openpi JAX folders."""

import json

import pytest
from typer.testing import CliRunner

from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.checkpoints.hub import looks_like_hub_id
from cortexflow.cli import app
from cortexflow.errors import CheckpointError
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A huggingface_hub cache folder holding ``cortexflow-test/tiny-pi0`` at ``main``, the layout
    ``hf download`` leaves: refs/main names a commit, snapshots/<commit>/ holds the files."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    repo = cache / "models--cortexflow-test--tiny-pi0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    write_checkpoint(repo / "snapshots" / COMMIT, tiny_model_config("pi0", chunk_size=7), seed=5, layout="lerobot")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("name, expected", [
    ("lerobot/pi0", True), ("lerobot/pi0@main", True), ("checkpoints/pi0_base", True),
    ("/abs/path", False), ("./rel/path", False), ("one", False), ("a/b/c", False), ("../x", False),
])
def test_hub_id_form(name, expected):
    assert looks_like_hub_id(name) is expected


def test_info_reads_a_cached_hub_id(hub_cache):
    result = runner.invoke(app, ["info", "cortexflow-test/tiny-pi0", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model_type"] == "pi0" and info["layout"] == "lerobot" and info["config"]["chunk_size"] == 7
    assert info["path"] == "cortexflow-test/tiny-pi0"


def test_uncached_hub_id_says_how_to_fetch_it(hub_cache):
    result = runner.invoke(app, ["info", "lerobot/pi0"])
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "not in huggingface_hub's local cache" in line and "hf download lerobot/pi0" in line


def test_missing_local_path_that_is_no_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointFiles.open(tmp_path / "nothing")


def test_safetensors_reader_names_an_orbax_folder_and_points_to_convert(tmp_path):
    """``info`` and the factories read Orbax folders themselves (tests/test_checkpoint_formats.py); a reader
    of safetensors only (the OpenVLA / RT-2 loaders) says what the folder is."""
    from cortexflow.checkpoints.files import CheckpointFiles
    from cortexflow.errors import CheckpointError

    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "_METADATA").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        CheckpointFiles.open(tmp_path)
    line = str(err.value)
    assert "openpi Orbax (JAX) checkpoint" in line and "cortexflow convert" in line and "cortexflow[jax]" in line

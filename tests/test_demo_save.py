"""``cortexflow demo --save DIR``: a complete checkpoint folder that info, run and the README's Python API use."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cortexflow.cli import app
from cortexflow.checkpoints.loader import inspect_checkpoint
from cortexflow.errors import CheckpointError
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_save")
    result = runner.invoke(app, ["demo", "--save", str(root / "checkpoints" / "demo_pi0"), "--repeat", "1",
                                 "--chunk", "6", "--steps", "2", "--seed", "4", "--json"])
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_saved_folder_holds_weights_config_tokenizer_and_stats(saved):
    root, demo = saved
    folder = root / "checkpoints" / "demo_pi0"
    for name in ("model.safetensors", "config.json", "tokenizer.model", "assets/demo/norm_stats.json"):
        assert (folder / name).is_file(), name
    assert demo["checkpoint"]["temporary"] is False


def test_info_reports_the_written_config(saved):
    root, demo = saved
    result = runner.invoke(app, ["info", str(root / "checkpoints" / "demo_pi0"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["ok"] and info["config"] == demo["config"]
    assert (info["config"]["num_vision_heads"], info["config"]["chunk_size"], info["config"]["num_diffusion_steps"]) \
        == (4, 6, 2)


def test_run_with_a_text_prompt_offline(saved, tmp_path):
    root, _ = saved
    folder = root / "checkpoints" / "demo_pi0"
    image = tmp_path / "cam.npy"
    np.save(image, np.random.default_rng(5).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    result = runner.invoke(app, ["run", "--checkpoint", str(folder), "--tokenizer", str(folder / "tokenizer.model"),
                                 "--norm-stats", str(folder), "--prompt", "pick up the red cube", "--state",
                                 "0.1,-0.2,0.3,0,0.5,-0.5,0.25,0", "--image", str(image), "--image", str(image),
                                 "--device", "cpu", "--seed", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shape"] == [6, 8] and np.isfinite(data["actions"]).all()


def test_readme_python_example_runs_as_written(saved, monkeypatch):
    root, _ = saved
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["actions"].shape == (6, 8)
    assert namespace["batch"].shape == (2, 6, 8)
    assert np.isfinite(namespace["actions"]).all()


def test_save_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    result = runner.invoke(app, ["demo", "--save", str(tmp_path)])
    assert result.exit_code == 2 and "not an empty folder" in result.stderr


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_written_config_is_honoured_and_checked(tmp_path, layout):
    config = tiny_model_config("pi05", num_vision_heads=6, chunk_size=7, num_diffusion_steps=4, max_token_len=40)
    folder = write_checkpoint(tmp_path / layout, config, seed=2, layout=layout)
    assert inspect_checkpoint(folder).config == config
    data = json.loads((folder / "config.json").read_text())
    data["cortexflow_model_config"]["model_type"] = "pi0"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="tensors hold a pi05 model"):
        inspect_checkpoint(folder)
    data["cortexflow_model_config"] = {"num_vision_head": 6}
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="num_vision_head"):
        inspect_checkpoint(folder)


@pytest.mark.parametrize("args", [["info", "demo"], ["run", "--checkpoint", "demo", "--image", "x.npy", "--device", "cpu"]])
def test_demo_as_a_checkpoint_name_points_to_save(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "cortexflow demo --save DIR" in result.stderr, result.output

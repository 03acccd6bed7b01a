"""The ``cortexflow`` command line: demo, info, run, and one-line errors with exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cortexflow.cli import app
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

runner = CliRunner()
FAST = ["--chunk", "5", "--steps", "3", "--device", "cpu"]
TOKENS = "2,17,42,108"
STATE = "0.1,-0.2,0.3,0.0,0.5,-0.5,0.25,0.0"
DOWN_PROJ = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.down_proj.weight"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Exit code 2, no traceback, and exactly one ``error: ...`` line on stderr that names each fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_checkpoints")
    config = tiny_model_config("pi0")
    paths = {
        "openpi": write_checkpoint(root / "openpi", config, seed=0),
        "lerobot": write_checkpoint(root / "lerobot", config, seed=0, layout="lerobot"),
        "pi05": write_checkpoint(root / "pi05", tiny_model_config("pi05"), seed=0),
    }
    tensors = load_file(str(paths["openpi"] / "model.safetensors"))
    (root / "missing").mkdir()
    save_file({k: v for k, v in tensors.items() if k != DOWN_PROJ}, str(root / "missing" / "model.safetensors"))
    paths["missing"] = root / "missing"
    misshaped = dict(tensors)
    misshaped["action_out_proj.weight"] = torch.zeros(3, 3)
    (root / "misshaped").mkdir()
    save_file(misshaped, str(root / "misshaped" / "model.safetensors"))
    paths["misshaped"] = root / "misshaped"
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    uint8 = root / "cam0.npy"
    np.save(uint8, rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8))
    floats = root / "cam1.npy"
    np.save(floats, rng.uniform(-1, 1, size=(96, 96, 3)).astype(np.float32))
    return [uint8, floats]


# ---- demo -----------------------------------------------------------------------------------
def test_demo_prints_tables_and_timings():
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("pi0", "parameters", "openpi layout", "model.safetensors", "no", "tokenizer", "byte",
                 "Action chunk (5, 8)", "a0", "a7", "latency", "first call", "median",
                 "preprocess", "vision_encoder", "transformer_encoder", "transformer_decoder", "total", "100.0"):
        assert text in out, text
    assert "deterministic: yes" in out


def test_demo_pi05_with_options():
    result = invoke("demo", "--model", "pi05", "--views", "1", "--chunk", "7", "--steps", "2", "--repeat", "2")
    assert result.exit_code == 0, result.output
    assert "pi05" in result.stdout and "Action chunk (7, 8)" in result.stdout


def test_demo_is_deterministic():
    first = json.loads(invoke("demo", "--json", "--repeat", "1").stdout)
    second = json.loads(invoke("demo", "--json", "--repeat", "2").stdout)
    assert first["shape"] == [5, 8] and first["model"] == "pi0"
    assert first["actions"] == second["actions"]
    assert second["deterministic"] is True
    assert first["tokenizer"] is None and first["prompt"] == "pick up the red cube"
    assert set(first["timings_ms"]) >= {"preprocess", "vision_encoder", "transformer_encoder", "transformer_decoder", "total"}
    other = json.loads(invoke("demo", "--json", "--repeat", "1", "--seed", "1").stdout)
    assert other["actions"] != first["actions"]


def test_demo_bad_option_is_one_line_error():
    assert_one_line_error(invoke("demo", "--model", "rt9"), "--model 'rt9' is not a model name", "pi0, pi05, openvla, rt2")
    assert_one_line_error(invoke("demo", "--repeat", "0"), "--repeat must be at least 1")


def test_console_script_runs_demo():
    script = Path(sys.executable).parent / "cortexflow"
    script = str(script) if script.exists() else shutil.which("cortexflow")
    assert script is not None, "the cortexflow console script is not installed (pip install -e .)"
    done = subprocess.run([script, "demo", "--json", "--repeat", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["shape"] == [5, 8]
    assert np.isfinite(np.array(data["actions"])).all()


# ---- info -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_info_describes_checkpoint(checkpoints, layout):
    result = invoke("info", checkpoints[layout])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("pi0", layout, "encoder_dim", "vision_encoder_dim", "action_dim", "vocab_size", "F32",
                 "198,744", "skipped as unused", "ok"):
        assert text in out, text
    data = json.loads(invoke("info", checkpoints[layout], "--json").stdout)
    assert data["model_type"] == "pi0" and data["layout"] == layout and data["ok"] is True
    assert data["config"]["encoder_dim"] == 64 and data["config"]["decoder_dim"] == 32
    assert data["config"]["num_vision_layers"] == 2 and data["config"]["vocab_size"] == 320
    assert data["num_parameters"] == 198_744 and data["dtypes"] == {"F32": 88}


def test_info_pi05(checkpoints):
    data = json.loads(invoke("info", checkpoints["pi05"], "--json").stdout)
    assert data["model_type"] == "pi05" and data["config"]["discrete_state_input"] is True


def test_info_lists_missing_tensor(checkpoints):
    result = invoke("info", checkpoints["missing"])
    assert result.exit_code == 1, result.output
    assert "missing tensors (1)" in result.stdout and DOWN_PROJ in result.stdout
    data = json.loads(invoke("info", checkpoints["missing"], "--json").stdout)
    assert data["ok"] is False and DOWN_PROJ in data["missing"][0]


def test_info_lists_mis_shaped_tensor(checkpoints):
    result = invoke("info", checkpoints["misshaped"])
    assert result.exit_code == 1, result.output
    assert "mis-shaped tensors (1)" in result.stdout
    assert "action_out_proj.weight [3, 3] (expected [8, 32])" in result.stdout


def test_info_model_config_override(checkpoints):
    data = json.loads(invoke("info", checkpoints["openpi"], "--json", "--model-config", '{"chunk_size": 9}').stdout)
    assert data["config"]["chunk_size"] == 9


def test_info_errors(checkpoints, tmp_path):
    assert_one_line_error(invoke("info", tmp_path / "nothing_here"), "does not exist", "nothing_here")
    llama = tmp_path / "llama.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(llama))
    assert_one_line_error(invoke("info", llama), "not a Pi0/Pi0.5 checkpoint", "model.layers.0.self_attn.q_proj.weight")
    assert_one_line_error(invoke("info", checkpoints["openpi"], "--model-config", "{bad json"), "not valid JSON")


# ---- run ------------------------------------------------------------------------------------
def run_args(checkpoint, images, *extra):
    args = ["run", "--checkpoint", checkpoint]
    for image in images:
        args += ["--image", image]
    return [*args, *FAST, *extra]


def test_run_prints_json(checkpoints, images):
    result = invoke(*run_args(checkpoints["openpi"], images, "--prompt-tokens", TOKENS, "--state", STATE, "--seed", "0"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shape"] == [5, 8] and data["model"] == "pi0"
    assert np.array(data["actions"]).shape == (5, 8)
    assert data["latency_ms"] > 0
    again = json.loads(invoke(*run_args(checkpoints["openpi"], images, "--prompt-tokens", TOKENS, "--state", STATE, "--seed", "0")).stdout)
    assert again["actions"] == data["actions"]


def test_run_lerobot_layout_state_file_and_mask(checkpoints, images, tmp_path):
    state_file = tmp_path / "state.npy"
    np.save(state_file, np.linspace(-0.5, 0.5, 6).astype(np.float32))
    result = invoke(*run_args(checkpoints["lerobot"], images, "--prompt-tokens", "[2, 5, 9]",
                              "--state-file", state_file, "--mask-view", "1", "--dtype", "float32", "--chunk", "4"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shape"] == [4, 8]


def test_run_detects_pi05(checkpoints, images):
    result = invoke(*run_args(checkpoints["pi05"], images[:1], "--prompt-tokens", TOKENS))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "pi05" and data["shape"] == [5, 8]


def test_run_with_tokenizer_and_prompt(checkpoints, images, tiny_tokenizer_path):
    result = invoke(*run_args(checkpoints["openpi"], images, "--prompt", "pick up the red block",
                              "--tokenizer", tiny_tokenizer_path, "--state", STATE))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shape"] == [5, 8]


def test_run_missing_image_file(checkpoints, images, tmp_path):
    missing = tmp_path / "no_camera.npy"
    result = invoke(*run_args(checkpoints["openpi"], [images[0], missing], "--prompt-tokens", TOKENS, "--state", STATE))
    assert_one_line_error(result, "image file", "no_camera.npy", "does not exist")


def test_run_wrong_view_count(checkpoints, images):
    result = invoke(*run_args(checkpoints["openpi"], images, "--views", "3", "--prompt-tokens", TOKENS, "--state", STATE))
    assert_one_line_error(result, "got 2 camera views, expected num_views=3")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--prompt-tokens", TOKENS], ["needs the robot state", "--state"]),
        (["--state", STATE], ["no prompt"]),
        (["--prompt", "pick it up", "--state", STATE], ["--prompt needs --tokenizer"]),
        (["--prompt-tokens", "2,x,3", "--state", STATE], ["--prompt-tokens", "'x' is not an integer"]),
        (["--prompt-tokens", "2,999", "--state", STATE], ["outside the vocabulary"]),
        (["--prompt-tokens", TOKENS, "--state", "0.1,nan"], ["NaN or inf"]),
        (["--prompt-tokens", TOKENS, "--state", STATE, "--dtype", "float64"], ["--dtype 'float64'", "bfloat16, float16 or float32"]),
        (["--prompt-tokens", TOKENS, "--state", STATE, "--backend", "cuda"], ["'cuda' is not available in this version"]),
        (["--prompt-tokens", TOKENS, "--state", STATE, "--model", "pi05"], ["holds a pi0 model", "--model pi0"]),
        (["--prompt-tokens", TOKENS, "--state", STATE, "--mask-view", "2"], ["--mask-view [2] out of range"]),
        (["--prompt-tokens", TOKENS, "--state", STATE, "--model-config", '{"hidden": 1}'], ["unknown ModelConfig field"]),
        (["--prompt-tokens", TOKENS, "--state", STATE, "--norm-stats", "/nonexistent/stats.json"], ["norm stats path"]),
    ],
)
def test_run_bad_input_is_one_line_error(checkpoints, images, extra, fragments):
    assert_one_line_error(invoke(*run_args(checkpoints["openpi"], images, *extra)), *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_run_cuda_without_gpu(checkpoints, images):
    args = run_args(checkpoints["openpi"], images, "--prompt-tokens", TOKENS, "--state", STATE)
    args[args.index("--device") + 1] = "cuda"
    assert_one_line_error(invoke(*args), "no CUDA GPU is available")


def test_run_bad_image_content(checkpoints, images, tmp_path):
    chw = tmp_path / "chw.npy"
    np.save(chw, np.zeros((3, 64, 64), np.uint8))
    result = invoke(*run_args(checkpoints["openpi"], [images[0], chw], "--prompt-tokens", TOKENS, "--state", STATE))
    assert_one_line_error(result, "view 1", "CHW")
    text = tmp_path / "cam.txt"
    text.write_text("not an image")
    result = invoke(*run_args(checkpoints["openpi"], [images[0], text], "--prompt-tokens", TOKENS, "--state", STATE))
    assert_one_line_error(result, "cam.txt", "expected .npy")


def test_run_png_needs_pillow(checkpoints, images, tmp_path):
    try:
        from PIL import Image
    except ImportError:
        png = tmp_path / "cam.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n")
        result = invoke(*run_args(checkpoints["openpi"], [images[0], png], "--prompt-tokens", TOKENS, "--state", STATE))
        assert_one_line_error(result, "pip install pillow", ".npy")
    else:
        png = tmp_path / "cam.png"
        Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(png)
        result = invoke(*run_args(checkpoints["openpi"], [images[0], png], "--prompt-tokens", TOKENS, "--state", STATE))
        assert result.exit_code == 0, result.output


def test_help_texts():
    for command in ([], ["demo"], ["run"], ["info"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0, result.output
    run_help = invoke("run", "--help").stdout
    for text in ("--checkpoint", "--image", ".npy", "--prompt-tokens", "--state-file", "--model-config", "--mask-view"):
        assert text in run_help, text

"""The command line as a new user meets it: warnings, one list of names, error order and wording."""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cortexflow as cf
from cortexflow.backends import available_backends
from cortexflow.cli import app
from cortexflow.config import IMAGE_PROMPT_MODELS, SUPPORTED_MODELS
from cortexflow.kernels import TESTED_TRITON_VERSION
from cortexflow.tools.native_stderr import dropping_native_lines

runner = CliRunner()

WARNING_COMMAND = textwrap.dedent("""
    import warnings
    import typer
    from cortexflow.cli import cli_errors
    from cortexflow.errors import CortexFlowWarning

    app = typer.Typer()

    @app.command()
    @cli_errors
    def noisy() -> None:
        warnings.warn("third-party warning text", UserWarning)
        warnings.warn("cortexflow warning text", CortexFlowWarning)
        print("command done")

    app()
""")


def test_command_that_warns_exits_promptly_with_each_warning_once():
    done = subprocess.run([sys.executable, "-c", WARNING_COMMAND], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "command done"
    assert done.stderr.count("third-party warning text") == 1, done.stderr
    assert done.stderr.count("warning: cortexflow warning text") == 1, done.stderr


# ---- one list of names, CLI wording, cheap options first ------------------------------------------

def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def test_demo_rejects_a_model_it_does_not_build_listing_the_ones_it_does():
    line = one_error_line(runner.invoke(app, ["demo", "--model", "rt1"]))
    assert "demo takes" in line
    assert all(m.value in line for m in IMAGE_PROMPT_MODELS)


@pytest.mark.parametrize("command", ["demo", "run", "profile"])
def test_help_lists_the_models_each_command_takes(command):
    text = " ".join(runner.invoke(app, [command, "--help"]).stdout.split())
    assert all(m.value in text for m in IMAGE_PROMPT_MODELS), text
    assert "rt1" not in text


@pytest.mark.parametrize("command", ["verify", "bench", "serve"])
def test_verify_bench_and_serve_help_list_every_supported_model(command):
    text = " ".join(runner.invoke(app, [command, "--help"]).stdout.split())
    assert all(m.value in text for m in SUPPORTED_MODELS), text


@pytest.mark.parametrize("command", ["run", "verify", "profile", "serve"])
def test_help_lists_every_backend(command):
    text = " ".join(runner.invoke(app, [command, "--help"]).stdout.split())
    assert ", ".join(available_backends()) in text, text
    assert "ships" not in text


@pytest.mark.parametrize("option, value, fragment", [
    ("--dtype", "fp8", "--dtype 'fp8'"),
    ("--backend", "cuda", "backend 'cuda' is not available"),
    ("--backend", "tensorrt", "--backend 'tensorrt'"),
    ("--device", "tpu", "--device 'tpu'"),
])
def test_run_checks_cheap_options_before_reading_inputs(tmp_path, option, value, fragment):
    """The image and the checkpoint do not exist: the bad option is still the one reported."""
    line = one_error_line(runner.invoke(app, ["run", "--checkpoint", str(tmp_path / "none"), "--image",
                                              str(tmp_path / "none.npy"), "--prompt-tokens", "2,3", option, value]))
    assert fragment in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
@pytest.mark.parametrize("command", [["run", "--image", "x.npy", "--checkpoint", "x", "--prompt-tokens", "2"],
                                     ["verify"], ["profile"], ["bench"], ["serve", "--checkpoint", "demo"]])
def test_device_error_names_the_cli_option(command):
    line = one_error_line(runner.invoke(app, [*command, "--device", "cuda"]))
    assert "--device cpu" in line and "device='cpu'" not in line


def test_run_with_the_wrong_model_names_the_cli_option(tmp_path):
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "pi05", tiny_model_config("pi05"), seed=1)
    image = tmp_path / "cam.npy"
    np.save(image, np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    line = one_error_line(runner.invoke(app, ["run", "--checkpoint", str(checkpoint), "--image", str(image),
                                              "--prompt-tokens", "2,3", "--model", "pi0", "--device", "cpu"]))
    assert "--model pi05" in line and "create_" not in line


def test_factory_keyword_typo_is_a_config_error():
    with pytest.raises(cf.ConfigError, match=r"num_view \(did you mean num_views\?\)"):
        cf.create_pi0_inference("unused", num_view=3)


def test_missing_onnx_package_is_said_once(tmp_path):
    script = ("import sys; sys.modules['onnxscript'] = None\n"
              "from cortexflow.cli import app\n"
              f"app(['export', '--checkpoint', 'demo', '--out', {str(tmp_path)!r}, '--stages', 'vision'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].count("pip install") == 1 and " | " not in errors[0], done.stderr
    assert 'pip install "cortexflow[onnx]"' in errors[0]


def test_run_openvla_one_image_prompt_tokens(tmp_path):
    from cortexflow.random_token_vla import example_norm_stats, tiny_openvla_config, write_openvla_checkpoint

    config = tiny_openvla_config()
    write_openvla_checkpoint(tmp_path / "vla", config, seed=3, dtype=torch.float32,
                             norm_stats=example_norm_stats(config.action_dim))
    image = tmp_path / "cam.npy"
    np.save(image, np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    args = ["run", "--checkpoint", str(tmp_path / "vla"), "--image", str(image), "--prompt-tokens",
            f"{config.bos_id},40,41,42", "--device", "cpu", "--model-config",
            json.dumps({"space_token_id": config.space_token_id})]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "openvla" and data["shape"] == [config.action_dim] and len(data["tokens"]) == 7
    assert np.isfinite(data["actions"]).all()
    line = one_error_line(runner.invoke(app, [*args, "--state", "0.1,0.2"]))
    assert "no robot state" in line
    line = one_error_line(runner.invoke(app, [*args, "--steps", "4"]))
    assert "--steps" in line
    text_prompt = [a if a != f"{config.bos_id},40,41,42" else "pick up the spoon" for a in args]
    text_prompt[text_prompt.index("--prompt-tokens")] = "--prompt"
    line = one_error_line(runner.invoke(app, text_prompt))
    assert "--prompt needs a tokenizer" in line and "--tokenizer" in line


# ---- the triton extra -------------------------------------------------------------------------------
def test_triton_extra_pins_the_tested_version():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pins = [req for req in project["optional-dependencies"]["triton"] if req.startswith("triton")]
    assert pins and all(req.startswith(f"triton=={TESTED_TRITON_VERSION}") for req in pins), pins
    assert any(req.startswith(f"triton=={TESTED_TRITON_VERSION}") for req in project["optional-dependencies"]["test"])


def test_missing_triton_names_the_extra():
    script = ("import sys; sys.modules['triton'] = None\n"
              "import torch\n"
              "from cortexflow.backends import create_backend\n"
              "from cortexflow.errors import BackendUnavailableError\n"
              "try:\n"
              "    create_backend('triton', torch.device('cpu'), torch.float32)\n"
              "except BackendUnavailableError as err:\n"
              "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert 'pip install "cortexflow[triton]"' in done.stdout and "triton==3.7.1" in done.stdout, done


# ---- profile on the CPU ------------------------------------------------------------------------------
def test_native_stderr_lines_dropped_and_others_kept(capfd):
    with dropping_native_lines():
        os.write(2, b"USDT:2026-12-06 SyncActivityProfilerHandler.cpp:52] profiler_start\nkeep this line\n")
        os.write(2, b"USDT:2026-12-06 SyncActivityProfilerHandler.cpp:59] profiler_stop\n")
    err = capfd.readouterr().err
    assert "keep this line" in err and "USDT" not in err


def test_cpu_profile_without_profiler_noise_or_zero_rates():
    done = subprocess.run([sys.executable, "-m", "cortexflow.cli", "profile", "--model", "pi0", "--device", "cpu",
                           "--size", "tiny", "--views", "1", "--repeats", "1", "--top", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "USDT" not in done.stdout
    header = next(line for line in done.stdout.splitlines() if "GFLOP/s" in line)
    assert "floor" not in header  # no device peaks on the CPU: no floor columns
    for stage in ("vision_encoder", "transformer_encoder", "transformer_decoder"):
        row = next(line for line in done.stdout.splitlines() if line.strip().startswith(stage)).split()
        assert float(row[4].replace(",", "")) > 0 and float(row[5].replace(",", "")) > 0, row


def test_verify_reports_each_module_as_it_finishes():
    """Progress per module on stderr; one timed run by default under the Triton interpreter (CPU tests)."""
    from cortexflow.kernels.runtime import interpreting

    result = runner.invoke(app, ["verify", "--model", "pi0", "--backend", "pytorch", "--size", "tiny", "--device", "cpu",
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workload"]["repeats"] == (1 if interpreting() else 3)
    assert "checking patch_embed (1/9) ..." in result.stderr
    assert "checking actions (9/9) ..." in result.stderr and "actions: ok in " in result.stderr

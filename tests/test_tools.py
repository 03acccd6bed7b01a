"""The measurement tools: verify, bench, profile (tiny models on CPU) and the FLOP/byte counts (real Pi0)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cortexflow.backends import PyTorchBackend, register_backend
from cortexflow.backends import _REGISTRY as BACKEND_REGISTRY
from cortexflow.cli import app
from cortexflow.config import ModelConfig
from cortexflow.errors import BackendUnavailableError
from cortexflow.random_checkpoint import random_weights, tiny_model_config
from cortexflow.tools.flops import floor_ms, stage_costs
from cortexflow.tools.verify import MODULES, run_verify

runner = CliRunner()
VISION_MODULES = ("patch_embed", "vision_layer", "vision_tower", "projector", "vision_encoder")
GEMMA_MODULES = ("prefix_layer", "prefix", "denoise_step", "actions")


class BrokenRmsNormBackend(PyTorchBackend):
    """RMSNorm that forgets Gemma's ``1 +`` on the scale: every Gemma layer goes wrong, SigLIP does not."""

    name = "broken-rms"

    def rms_norm(self, x, weight, eps):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        return (y if weight is None else y * weight.float()).to(x.dtype)


class NoDecoderBackend(PyTorchBackend):
    name = "no-decoder"

    def transformer_decoder(self, model, weights, inputs):
        raise NotImplementedError("no decoder stage here")


class GpuOnlyBackend(PyTorchBackend):
    name = "gpu-only"

    def __init__(self, device, dtype):
        if torch.device(device).type != "cuda":
            raise BackendUnavailableError("the gpu-only backend needs a CUDA GPU")
        super().__init__(device, dtype)


@pytest.fixture
def registered():
    """Register the test backends for one test, then remove them."""
    for cls in (BrokenRmsNormBackend, GpuOnlyBackend):
        register_backend(cls.name, cls)
    yield
    for cls in (BrokenRmsNormBackend, GpuOnlyBackend):
        BACKEND_REGISTRY.pop(cls.name, None)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows_by_name(report):
    return {row["name"]: row for row in report["modules"]}


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_verify_reference_against_itself_is_exact(model):
    report = run_verify(model, "pytorch", size="tiny", device="cpu", dtype="float32", repeats=1)
    rows = rows_by_name(report)
    assert list(rows) == [m.name for m in MODULES]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["rel_l2"] <= 1e-6 and row["max_abs"] <= 1e-5, row
        assert row["ref_norm"] > 0 and row["reference_ms"] > 0 and row["backend_ms"] > 0
    assert report["passed"] and report["threshold_rel_l2"] == 1e-4


def test_verify_bfloat16_is_within_its_limit():
    report = run_verify("pi0", "pytorch", size="tiny", device="cpu", dtype="bfloat16", repeats=1,
                        modules=["prefix", "actions"])
    rows = rows_by_name(report)
    assert list(rows) == ["prefix", "actions"]
    assert 0 < rows["actions"]["rel_l2"] <= 2e-2 and report["passed"]


def test_verify_finds_a_broken_rms_norm(registered, tmp_path):
    path = tmp_path / "verify.json"
    result = invoke("verify", "--backend", "broken-rms", "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                    "--repeats", "1", "--json", path)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout
    report = json.loads(path.read_text())
    rows = rows_by_name(report)
    assert not report["passed"] and report["backend"] == "broken-rms"
    for name in VISION_MODULES:
        assert rows[name]["rel_l2"] <= 1e-6, rows[name]
    for name in GEMMA_MODULES:
        assert rows[name]["rel_l2"] > 1e-2 and rows[name]["status"] == "over", rows[name]


def test_verify_marks_unimplemented_modules_na():
    report = run_verify("pi05", NoDecoderBackend, size="tiny", device="cpu", dtype="float32", repeats=1)
    rows = rows_by_name(report)
    for name in ("denoise_step", "actions"):
        assert rows[name]["status"] == "n/a" and "no decoder stage here" in rows[name]["reason"]
    assert rows["prefix"]["status"] == "ok"
    assert not report["passed"]


def test_bench_tiny_cpu_json(registered, tmp_path):
    path = tmp_path / "bench.json"
    result = invoke("bench", "--models", "pi0,pi05", "--backends", "pytorch,gpu-only", "--views", "1,2",
                    "--chunk", "5", "--steps", "2", "--iters", "2", "--warmup", "1", "--size", "tiny",
                    "--device", "cpu", "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("device", "device_type", "torch", "triton", "cuda", "python", "command", "timestamp"):
        assert key in env
    assert env["device_type"] == "cpu" and isinstance(env["command"], str)
    assert data["workload"]["size"] == "tiny" and data["workload"]["dtype"] == "float32"
    assert data["workload"]["triton_options"] is None  # no triton backend in the grid
    runs = data["runs"]
    assert [(r["model"], r["views"]) for r in runs] == [("pi0", 1), ("pi0", 2), ("pi05", 1), ("pi05", 2)]
    for r in runs:
        assert r["backend"] == "pytorch" and r["cuda_graphs"] is False and r["timing"] == "host_clock"
        assert r["chunk"] == 5 and r["steps"] == 2 and r["prompt_len"] == 20 and r["iters"] == 2
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["peak_gpu_gib"] is None and set(r["stages_ms"]) >= {"vision_encoder", "transformer_decoder"}
        assert r["backend_options"] is None  # the pytorch backend has no options
    skipped = data["skipped"]
    assert [(s["model"], s["backend"]) for s in skipped] == [("pi0", "gpu-only"), ("pi05", "gpu-only")]
    assert "needs a CUDA GPU" in skipped[0]["reason"]
    assert "skipped pi0 gpu-only" in result.stdout


def test_bench_rejects_bad_options():
    result = invoke("bench", "--graphs", "maybe", "--device", "cpu")
    assert result.exit_code == 2 and "--graphs" in result.stderr
    result = invoke("bench", "--backends", "no-such-backend", "--device", "cpu", "--size", "tiny")
    assert result.exit_code == 2 and "no-such-backend" in result.stderr


def test_triton_options_are_checked_before_anything_runs():
    """--triton-options: a removed or misspelt field, a bad value, or options without the triton backend are
    errors naming the CLI option, before any weights are drawn."""
    result = invoke("bench", "--backends", "triton", "--triton-options", "fold_norms=1", "--device", "cpu",
                    "--size", "tiny")
    assert result.exit_code == 2 and "--triton-options: unknown Triton option(s) ['fold_norms']" in result.stderr
    result = invoke("bench", "--backends", "triton", "--triton-options", "pdl=maybe", "--device", "cpu")
    assert result.exit_code == 2 and "TritonOptions.pdl must be 'auto', 'on' or 'off'" in result.stderr
    result = invoke("bench", "--backends", "pytorch", "--triton-options", "pdl=off", "--device", "cpu")
    assert result.exit_code == 2 and "--triton-options applies to the triton backend" in result.stderr
    result = invoke("verify", "--backend", "pytorch", "--triton-options", "pdl=off", "--device", "cpu")
    assert result.exit_code == 2 and "--triton-options applies to the triton backend" in result.stderr


def test_profile_tiny_cpu(tmp_path):
    path = tmp_path / "profile.json"
    result = invoke("profile", "--model", "pi0", "--size", "tiny", "--device", "cpu", "--top", "5", "--repeats", "1",
                    "--json", path)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["vision_encoder", "transformer_encoder", "transformer_decoder"]
    for row in stages.values():
        assert row["time_ms"] > 0 and row["flop"] > 0 and row["bytes"] > 0 and row["achieved_tflops"] > 0
        assert row["floor_ms"] is None
    assert stages["transformer_decoder"]["repeats"] == 3
    assert report["peaks"] is None and report["totals"]["floor_ms"] is None
    kernels = report["kernels"]["top"]
    assert 0 < len(kernels) <= 5 and all(k["count"] >= 1 and 0 < k["share"] <= 1 for k in kernels)
    assert kernels[0]["total_ms"] >= kernels[-1]["total_ms"]
    assert "transformer_encoder" in result.stdout and kernels[0]["name"] in result.stdout


def test_profile_floor_with_given_peaks():
    from cortexflow.tools.profile import run_profile

    report = run_profile("pi05", size="tiny", device="cpu", repeats=1, top=3, peak_tflops=1.0, peak_gbps=10.0)
    for row in report["stages"]:
        assert row["floor_ms"] > 0 and row["bound"] in ("compute", "memory")
        assert row["gap"] == pytest.approx(row["time_ms"] / row["floor_ms"])
    assert report["totals"]["floor_ms"] == pytest.approx(sum(r["floor_ms"] for r in report["stages"]))


def test_flops_match_the_spec_for_real_pi0():
    config = ModelConfig.for_model("pi0")
    full = stage_costs(config, views=2, prompt_len=20, chunk=50, steps=10, last_layer_kv_only=False)
    skip = stage_costs(config, views=2, prompt_len=20, chunk=50, steps=10)
    close = lambda value, spec: abs(value / spec - 1) < 5e-3  # noqa: E731
    assert close(full["vision"].flop / 1e9, 440.4)
    assert close(full["vision"].bytes / 1e6, 828.8)
    assert close(full["prefix"].flop / 1e9, 2150.4)
    assert close(skip["prefix"].flop / 1e9, 2032.0)
    assert close(full["prefix"].bytes / 1e6, 3963.6) and close(skip["prefix"].bytes / 1e6, 3745.5)
    assert close(full["expert"].flop / 1e9, 36.47) and full["expert"].repeats == 10
    assert close(full["expert"].total_flop / 1e9, 364.7)
    assert close(full["expert"].bytes / 1e6, 629.3 + 9.8)
    assert close(floor_ms(full, 790e12, 3.0e12), 5.41) and close(floor_ms(skip, 790e12, 3.0e12), 5.26)
    assert close(floor_ms(stage_costs(config, 1, 20, 50, 10, last_layer_kv_only=False), 790e12, 3.0e12), 3.79)


def test_random_weights_on_the_cpu_device_are_the_default_draw():
    config = tiny_model_config("pi05")
    default, on_cpu = random_weights(config, seed=4), random_weights(config, seed=4, device="cpu")
    assert default.keys() == on_cpu.keys()
    assert all(torch.equal(default[k], on_cpu[k]) for k in default)
    assert all(t.count_nonzero() > 0 for t in default.values())

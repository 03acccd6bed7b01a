"""``cortexflow compile-check``: every Triton kernel of a real-size Pi0 / Pi0.5 predict compiled for sm_90
(H100) on this GPU-less machine, with each TritonOptions variant, and the resource checks it makes.

The compile runs in a subprocess: this test process runs the kernels in Triton's interpreter
(``conftest.py``), which replaces Triton's compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cortexflow.errors import ConfigError
from cortexflow.kernels.runtime import CompileTarget
from cortexflow.tools import compile_check
from cortexflow.tools.compile_check import CompiledLaunch, programs_per_sm

pytest.importorskip("triton")

DEFAULT_KERNELS = {"_expert_step_kernel", "_attention_kernel", "_qkv_rope_kernel", "_layer_norm_kernel",
                   "_gelu_gate_kernel", "_rms_norm_kernel"}
#: Kernels only the other variants launch (one expert layer a launch, the kernel chain's combine, the op-by-op
#: encoder's RoPE).
VARIANT_KERNELS = {"_expert_layer_kernel", "_combine_kernel", "_rope_kernel"}


def compile_check_cli(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``cortexflow compile-check ARGS --json`` in a subprocess without the interpreter and with an empty
    Triton cache (every kernel compiled for real); returns the finished process and the JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    out = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, "-c", "from cortexflow.cli import app; app()", "compile-check", *args,
                           "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


@pytest.fixture(scope="module")
def pi0_family_run(tmp_path_factory):
    """compile-check of Pi0 and Pi0.5 at one view, every variant (compiled once for the tests below)."""
    return compile_check_cli(tmp_path_factory.mktemp("compile_pi0"), "--models", "pi0,pi05", "--views", "1",
                             "--variants", "all")


@pytest.fixture(scope="module")
def token_vla_run(tmp_path_factory):
    """compile-check of OpenVLA and RT-2 (prefill and every decode step), every variant."""
    return compile_check_cli(tmp_path_factory.mktemp("compile_token"), "--models", "openvla,rt2", "--variants", "all")


def test_every_variant_compiles_for_hopper_at_real_size(pi0_family_run):
    done, report = pi0_family_run
    assert "compile for sm_90 and fit" in done.stdout
    assert report["passed"] and not report["problems"]
    assert report["target"] == {"arch": "sm_90", "processors": 132}
    assert len(report["cases"]) == 2 * len(compile_check.VARIANTS)
    names = {k["name"] for k in report["kernels"]}
    assert DEFAULT_KERNELS | VARIANT_KERNELS <= names, names
    default_names = {k["name"] for k in report["kernels"] if "default" in k["variants"]}
    assert DEFAULT_KERNELS <= default_names <= DEFAULT_KERNELS | {"_combine_kernel"}  # split prefix attention
    for kernel in report["kernels"]:
        assert 0 < kernel["registers"] <= 255
        assert kernel["shared_bytes"] <= compile_check.SM_LIMITS[90].program_shared
        assert kernel["programs_per_sm"] >= 1
    experts = [k for k in report["kernels"] if k["name"] in ("_expert_layer_kernel", "_expert_step_kernel")]
    # The persistent kernels run one program per SM of the target (132), all resident at once.
    assert {k["max_grid"] for k in experts} == {132}
    # Every call after the first: the time terms come from tables made once (no sin / cos / linspace kernels
    # per call), and the Pi0 family's GEMMs stay on cuBLAS (torch ops) beside the Triton kernels.
    default = {(c["model"], c["views"]): c for c in report["cases"] if c["variant"] == "default"}
    for case in report["cases"]:
        if case["variant"] == "expert-layer":
            # 18 expert layers and the final norm a step, and the action path's torch kernels (fp32 GEMMs, SiLU,
            # the update), where the default launches one kernel an Euler step.
            assert case["launches"] >= default[case["model"], case["views"]]["launches"] + 170, case
            assert {"addmm", "add_"} <= set(case["torch_ops"]), case["torch_ops"]
        elif case["variant"] == "kernel-chain":
            assert case["launches"] > 300, case
        else:
            assert not {"addmm", "silu", "add_"} & set(case["torch_ops"]), case["torch_ops"]
            assert case["launches"] > 150, case
        assert case["torch_kernels"] > 100, case
        assert not {"sin", "cos", "linspace", "reciprocal", "pow"} & set(case["torch_ops"]), case["torch_ops"]
        # The fused prefix's QKV/RoPE kernels write K/V into the buffers the denoising steps read (no copy per
        # layer); the op-by-op encoder copies each layer's K/V once.
        if case["variant"] != "op-by-op-encoder":
            assert case["torch_ops"].get("copy_", 0) < 18, case
        else:
            assert case["torch_ops"].get("copy_", 0) >= 2 * 18, case
    # One launch an Euler step (10 per predict) by default, 18 layers x 10 steps with "layer" (Pi0 and Pi0.5).
    assert sum(k["launches_by_variant"].get("default", 0) for k in experts) == 2 * 10
    assert sum(k["launches_by_variant"].get("expert-layer", 0) for k in experts) == 2 * 180
    assert sum(k["launches_by_variant"].get("kernel-chain", 0) for k in experts) == 0
    assert report["triton_options"]["kernel-chain"]["persistent_expert"] is False
    assert report["triton_options"]["default"] == report["triton_options"]["op-by-op-encoder"] | {"fused_encoder": True}


def test_token_vlas_decode_kernels_compile_for_hopper(token_vla_run):
    _, report = token_vla_run
    assert report["passed"]
    assert [(c["model"], c["views"]) for c in report["cases"]] == [("openvla", None), ("rt2", None)] * len(
        compile_check.VARIANTS)
    by_variant = {}
    for kernel in report["kernels"]:
        for variant in kernel["variants"]:
            by_variant.setdefault(variant, set()).add(kernel["name"])
    # Default decode steps: fused decode GEMVs (norm prologue / residual epilogues), QKV + RoPE + KV-cache write
    # in one GEMV, folded norms (row statistics only), all compiled with programmatic dependent launch.
    assert {"_decode_gemv_kernel", "_decode_qkv_rope_kernel", "_rms_rstd_kernel"} <= by_variant["default"]
    assert "_decode_qkv_rope_kernel" not in by_variant["token-unfused"]
    assert "_decode_gemv_kernel" not in by_variant["token-unfused"]
    assert "_rms_norm_kernel" in by_variant["token-unfused"]
    # Every variant changes what the token VLAs compile or launch, except those of the Pi0 family's stages.
    signatures = _signatures(report)
    assert signatures["kernel-chain"] == signatures["op-by-op-encoder"] == signatures["default"]
    assert signatures["token-unfused"] != signatures["default"]


def _signatures(report) -> dict[str, frozenset]:
    """Per variant: the set of (compiled specialisation, launches of it) over all compiled cases."""
    signatures = {name: set() for name in report["variants"]}
    for kernel in report["kernels"]:
        for variant, launches in kernel["launches_by_variant"].items():
            signatures[variant].add((kernel["hash"], launches))
    return {name: frozenset(sig) for name, sig in signatures.items()}


def test_every_pair_of_variants_compiles_or_launches_something_different(pi0_family_run, token_vla_run):
    """No variant is a no-op on the models it is for: across the Pi0 family and the token VLAs, each pair of
    variants differs in the kernel specialisations compiled or in how often each is launched (a variant that an
    option no longer reaches would compile the default's kernels again)."""
    pi0_signatures, token_signatures = _signatures(pi0_family_run[1]), _signatures(token_vla_run[1])
    assert set(pi0_signatures) == set(token_signatures) == set(compile_check.VARIANTS)
    signatures = {name: (pi0_signatures[name], token_signatures[name]) for name in pi0_signatures}
    names = sorted(signatures)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert signatures[a] != signatures[b], f"variants {a} and {b} compile and launch the same kernels"


def test_programs_per_sm_follows_the_hopper_limits():
    assert programs_per_sm(registers=32, num_warps=4, shared_bytes=0) == 16           # warps: 64 / 4
    assert programs_per_sm(registers=255, num_warps=4, shared_bytes=0) == 2           # 256 regs x 128 threads
    assert programs_per_sm(registers=255, num_warps=8, shared_bytes=0) == 1
    assert programs_per_sm(registers=180, num_warps=4, shared_bytes=97 * 1024) == 2   # the expert layer
    assert programs_per_sm(registers=64, num_warps=4, shared_bytes=120 * 1024) == 1   # shared memory
    assert programs_per_sm(registers=64, num_warps=4, shared_bytes=228 * 1024) == 0
    assert programs_per_sm(registers=16, num_warps=1, shared_bytes=0) == 32            # program limit
    l4 = compile_check.SM_LIMITS[89]
    assert programs_per_sm(registers=180, num_warps=4, shared_bytes=97 * 1024, limits=l4) == 1
    assert programs_per_sm(registers=16, num_warps=1, shared_bytes=0, limits=l4) == 24


def _fake_launch(name, grid, shared, warps=4, key="abc"):
    metadata = SimpleNamespace(hash=key * 4, shared=shared, num_warps=warps, num_stages=3)
    return CompiledLaunch(name, grid, {"BLOCK": 16}, SimpleNamespace(metadata=metadata, asm={"cubin": b""}), 0.1)


def test_summarize_flags_unresident_persistent_grids_and_shared_memory_overflow(monkeypatch):
    monkeypatch.setattr(compile_check, "cubin_resources", lambda cubin: {
        "registers": 200, "stack": 0, "static_shared": 0, "local": 0, "local_instructions": 0})
    target = CompileTarget(arch=90, processors=4)
    usages = compile_check.summarize({"default": [
        _fake_launch("_expert_layer_kernel", (9,), 100 * 1024, key="aaa"),  # 2 per SM x 4 SMs = 8 < 9
        _fake_launch("_expert_layer_kernel", (8,), 100 * 1024, key="bbb"),  # fits
        _fake_launch("_attention_kernel", (1000,), 230 * 1024, key="ccc"),  # over 227 KiB
        _fake_launch("_attention_kernel", (1000,), 100 * 1024, key="ddd"),  # not persistent: any grid
    ]}, target)
    problems = {u.key: u.problems for u in usages}
    assert len(problems["aaaaaaaa"]) == 1 and "wait forever" in problems["aaaaaaaa"][0]
    assert problems["bbbbbbbb"] == []
    assert len(problems["cccccccc"]) == 1 and "227 KiB" in problems["cccccccc"][0]
    assert problems["dddddddd"] == []


def test_refuses_under_the_interpreter_and_bad_arguments(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="unset TRITON_INTERPRET"):
        with compile_check.compile_only(CompileTarget()):
            pass
    with pytest.raises(ConfigError, match="unknown variant"):
        compile_check.run_compile_check(variants=["default", "turbo"])
    with pytest.raises(ConfigError, match="compute capability 80, 86, 87, 89, 90"):
        compile_check.run_compile_check(arch=75)
    with pytest.raises(ConfigError, match="compile-check runs pi0, pi05, openvla, rt2"):
        compile_check.run_compile_check(models=["pi0", "rt1"])
    with pytest.raises(ConfigError, match="unset TRITON_INTERPRET"):
        compile_check.run_compile_check(models=["pi0"])


def test_hopper_only_options_are_refused_on_older_gpus(monkeypatch):
    """Programmatic dependent launch needs sm_90: pdl="on" is refused for an sm_80 target (A100), "auto" turns it
    off there and on for sm_90 (compile targets, as compile-check sets them: no interpreter)."""
    import torch

    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.errors import BackendUnavailableError
    from cortexflow.kernels import runtime

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    meta = torch.device("meta")
    previous = runtime.set_compile_target(CompileTarget(arch=80, processors=108))
    try:
        with pytest.raises(BackendUnavailableError, match="compute capability 9.0 or later"):
            TritonBackend.configured(pdl="on")(meta, torch.bfloat16)
        assert not TritonBackend(meta, torch.bfloat16).pdl
        runtime.set_compile_target(CompileTarget(arch=90, processors=132))
        assert TritonBackend.configured(pdl="on")(meta, torch.bfloat16).pdl
        assert TritonBackend(meta, torch.bfloat16).pdl
    finally:
        runtime.set_compile_target(previous)


TWO_TARGETS_SCRIPT = r"""
import json, sys, torch
from cortexflow.kernels.fp8_gemm import quantize_activation_rows
from cortexflow.kernels.runtime import CompileTarget
from cortexflow.tools.compile_check import compile_only

rows = torch.empty(8, 256, dtype=torch.bfloat16, device="meta")
targets = []
for arch in (89, 90, 89):
    with compile_only(CompileTarget(arch=arch, processors=132)) as launches:
        quantize_activation_rows(rows)
    ptx = launches[0].kernel.asm["ptx"]
    targets.append([line.split()[1] for line in ptx.splitlines() if line.startswith(".target")][0])
json.dump(targets, sys.stdout)
"""


def test_each_compile_only_block_compiles_for_its_own_target(tmp_path):
    """One kernel compiled for sm_89, then sm_90, then sm_89 again in one process: each block's PTX targets its
    own architecture (a JIT function keeps its first target per device index unless the block gives it a fresh
    cache)."""
    from compile_support import run_compile_script

    assert run_compile_script(TWO_TARGETS_SCRIPT, tmp_path) == ["sm_89", "sm_90a", "sm_89"]

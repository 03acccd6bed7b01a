"""``cortexflow verify`` and ``bench`` on the token-decoding OpenVLA and RT-2 (tiny models, CPU).

The Triton backend runs under TRITON_INTERPRET=1 (conftest) with 56 px images (16 image tokens instead
of 256) so that the interpreter stays fast; the PyTorch runs use the tiny configs unchanged.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from cortexflow.backends import PyTorchBackend, register_backend
from cortexflow.backends import _REGISTRY as BACKEND_REGISTRY
from cortexflow.cli import app
from cortexflow.errors import ConfigError
from cortexflow.tools.decoding_verify import run_token_verify
from cortexflow.tools.verify import run_verify

runner = CliRunner()
OPENVLA_MODULES = ["dino_tower", "siglip_tower", "projector", "vision_encoder", "llm_layer", "prefill_logits",
                   "decode_logits", "actions"]
RT2_MODULES = ["patch_embed", "vision_layer", "vision_tower", "projector", "vision_encoder", "llm_layer",
               "prefill_logits", "decode_logits", "actions"]
EXPECTED = {"openvla": OPENVLA_MODULES, "rt2": RT2_MODULES}
VISION = {"openvla": OPENVLA_MODULES[:4], "rt2": RT2_MODULES[:5]}
LANGUAGE = ("llm_layer", "prefill_logits", "decode_logits")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class NoisyRmsNormBackend(PyTorchBackend):
    """RMSNorm with 5% relative noise added: the Llama / Gemma layers go wrong, the ViTs (LayerNorm) do not."""

    name = "noisy-rms"

    def rms_norm(self, x, weight, eps):
        y = super().rms_norm(x, weight, eps)
        generator = torch.Generator(device=y.device).manual_seed(0)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        return (y.float() + 0.05 * y.float().std() * noise).to(y.dtype)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def noisy():
    register_backend(NoisyRmsNormBackend.name, NoisyRmsNormBackend)
    yield
    BACKEND_REGISTRY.pop(NoisyRmsNormBackend.name, None)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows_by_name(report):
    return {row["name"]: row for row in report["modules"]}


def check_passing_report(report, model):
    rows = rows_by_name(report)
    assert list(rows) == EXPECTED[model]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["rel_l2"] <= 1e-5 and row["max_abs"] <= 1e-4, row
        assert row["ref_norm"] > 0 and row["reference_ms"] > 0 and row["backend_ms"] > 0, row
    actions = rows["actions"]
    assert actions["tokens_agree"] == actions["tokens_total"] == report["workload"]["generated_tokens"]
    assert actions["tokens"] == actions["reference_tokens"] and actions["first_token_mismatch"] is None
    assert rows["decode_logits"]["tokens_agree"] == rows["decode_logits"]["tokens_total"]
    assert report["passed"] and report["failure"] is None and report["threshold_rel_l2"] == 1e-4
    assert report["model"] == model and report["workload"]["views"] == 1 and report["workload"]["prompt_tokens"] == 20


#: TritonOptions of the token-VLA variants (the rest stay at their defaults).
TOKEN_VARIANTS = {
    "default": {"pdl": "off"},
    "decode gemv off": {"decode_gemv": "off", "pdl": "off"},
    "norms not folded": {"fold_token_norms": False, "pdl": "off"},
    "separate qkv/rope kernel and head": {"decode_qkv_rope": False, "decode_head": False, "pdl": "off"},
    "combine kernel": {"fused_combine": "off", "pdl": "off"},
    "pdl, decode gemv on": {"pdl": "on"},
    "pdl, decode gemv off": {"decode_gemv": "off", "pdl": "on"},
}


#: (model, variant) cases: every variant for both models, but the combine kernel for RT-2 only (OpenVLA's Llama has
#: a KV head per query head, where the split attention's combine is never fused: that case is the default's).
TOKEN_CASES = [pytest.param(model, variant, marks=() if variant == "default" else pytest.mark.slow,
                            id=f"{model}-{variant}")
               for model in ("openvla", "rt2") for variant in TOKEN_VARIANTS
               if not (model == "openvla" and variant == "combine kernel")]


@pytest.mark.parametrize("model, variant", TOKEN_CASES)
def test_verify_triton_matches_pytorch(model, variant):
    """Module by module (towers, one LLM layer, prefill and teacher-forced decode logits, actions), with
    the default options (norm weights folded into QKV and gate/up; decode GEMVs), with the decode GEMV off,
    with the norms kept as kernels, with the QKV/RoPE kernel after the QKV GEMV instead of in its epilogue
    and the LM head on cuBLAS, with the attention's combine kernel in every layer, and with programmatic
    dependent launch (Hopper)."""
    pytest.importorskip("triton")
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.kernels.pdl import pdl_supported

    options = TOKEN_VARIANTS[variant]
    if options["pdl"] == "on" and not pdl_supported(torch.device(TRITON_DEVICE)):
        pytest.skip("programmatic dependent launch needs a CUDA GPU of compute capability >= 9.0 (Hopper)")
    backend = TritonBackend.configured(**options)
    report = run_token_verify(model, backend, size="tiny", device=TRITON_DEVICE, dtype="float32", repeats=1,
                              overrides={"image_size": 56})
    assert report["backend"] == "triton"
    assert report["backend_options"] == {**TritonOptions().as_dict(), **options}
    check_passing_report(report, model)
    # the image tokens went through the 56 px towers (16 patches)
    shapes = rows_by_name(report)
    assert shapes["vision_encoder"]["shape"].startswith("(1, 16,")
    assert report["config"]["model_type"] == model


def test_verify_rt2_pytorch_via_run_verify():
    report = run_verify("rt2", "pytorch", size="tiny", device="cpu", dtype="float32", repeats=1)
    check_passing_report(report, "rt2")
    rows = rows_by_name(report)
    assert rows["actions"]["shape"] == "(2, 3)" and rows["decode_logits"]["shape"] == "(6, 640)"


def test_verify_openvla_cli_json(tmp_path):
    path = tmp_path / "verify.json"
    result = invoke("verify", "--model", "openvla", "--backend", "pytorch", "--size", "tiny", "--device", "cpu",
                    "--dtype", "float32", "--repeats", "1", "--json", path)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "dino_tower" in result.stdout and "7/7 greedy tokens agree" in result.stdout
    report = json.loads(path.read_text())
    check_passing_report(report, "openvla")
    rows = rows_by_name(report)
    assert rows["actions"]["shape"] == "(7,)" and rows["prefill_logits"]["shape"] == "(1, 384)"
    assert rows["llm_layer"]["shape"] == "(1, 276, 64)"  # 256 image tokens + 20 prompt ids


@pytest.mark.parametrize("model", ["openvla", "rt2"])
def test_verify_finds_noisy_rms_norm(noisy, tmp_path, model):
    path = tmp_path / "verify.json"
    result = invoke("verify", "--model", model, "--backend", "noisy-rms", "--size", "tiny", "--device", "cpu",
                    "--dtype", "float32", "--repeats", "1", "--json", path)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout
    report = json.loads(path.read_text())
    rows = rows_by_name(report)
    assert list(rows) == EXPECTED[model] and not report["passed"]
    for name in VISION[model]:
        assert rows[name]["status"] == "ok" and rows[name]["rel_l2"] <= 1e-6, rows[name]
    for name in LANGUAGE:
        assert rows[name]["status"] == "over" and rows[name]["rel_l2"] > 1e-3, rows[name]


def test_verify_rejects_unknown_token_module():
    with pytest.raises(ConfigError, match="denoise_step"):
        run_verify("openvla", size="tiny", device="cpu", modules=["denoise_step"])


def test_bench_token_models_cpu(tmp_path):
    path = tmp_path / "bench.json"
    result = invoke("bench", "--models", "openvla,rt2", "--backends", "pytorch", "--views", "1,2", "--chunk", "5",
                    "--steps", "2", "--prompt-len", "8,20,100", "--iters", "2", "--warmup", "1", "--size", "tiny",
                    "--device", "cpu", "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    runs = data["runs"]
    assert [(r["model"], r["prompt_len"]) for r in runs] == [("openvla", 8), ("openvla", 20), ("rt2", 8), ("rt2", 20)]
    for r in runs:
        assert r["views"] == 1 and r["steps"] is None and r["cuda_graphs"] is False and r["timing"] == "host_clock"
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] and r["iters"] == 2
        assert r["peak_gpu_gib"] is None and set(r["stages_ms"]) == {"preprocess", "model", "total"}
        assert r["valid_prefix_tokens"] == 256 + r["prompt_len"] and r["padded_prompt_len"] >= r["prompt_len"]
    by_model = {r["model"]: r for r in runs}
    assert by_model["openvla"]["generated_tokens"] == 7 and by_model["openvla"]["chunk"] == 1
    assert by_model["rt2"]["generated_tokens"] == 6 and by_model["rt2"]["chunk"] == 2
    assert by_model["openvla"]["constrained"] is False and by_model["rt2"]["constrained"] is True
    assert sorted(s["model"] for s in data["skipped"]) == ["openvla", "rt2"]
    assert all("max_text_tokens 64" in s["reason"] for s in data["skipped"])
    assert len(data["notes"]) == 2 and "are ignored" in data["notes"][0]
    assert "openvla" in result.stdout and "do not apply" in result.stdout


def test_profile_token_model_counts_and_floor():
    """``profile --model openvla``: the prefill/decode counts against a hand count from the config, the
    floor from the given peaks, and the top ops of the profiled call."""
    from cortexflow.random_token_vla import tiny_openvla_config
    from cortexflow.tools.profile import run_profile

    report = run_profile("openvla", size="tiny", device="cpu", prompt_len=20, top=4, repeats=1,
                         peak_tflops=100.0, peak_gbps=1000.0)
    c = tiny_openvla_config()
    layer = c.llm_dim * (2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim) + 3 * c.llm_dim * c.llm_mlp_dim
    head = c.vocab_size * c.llm_dim
    prefill, decode = report["stages"]
    assert (prefill["stage"], decode["stage"]) == ("prefill", "decode")
    assert decode["repeats"] == c.action_dim - 1
    assert decode["flop_parts_per_call"] == {"llm_linears": 2 * c.llm_layers * layer, "head": 2 * head}
    assert prefill["flop_parts_per_call"]["head"] == 2 * head
    image_tokens = (c.image_size // c.patch_size) ** 2
    assert prefill["flop_parts_per_call"]["llm_linears"] == 2 * c.llm_layers * layer * (image_tokens + 20)
    for row in (prefill, decode):  # the row's flop and bytes are totals over its repeats
        expected = 1e3 * max(row["flop"] / 100e12, row["bytes"] / 1000e9)
        assert row["floor_ms"] == pytest.approx(expected)
    totals = report["totals"]
    assert totals["floor_ms"] == pytest.approx(prefill["floor_ms"] + decode["floor_ms"])
    assert totals["stages_ms"] > 0 and totals["gap"] == pytest.approx(totals["stages_ms"] / totals["floor_ms"])
    assert len(report["kernels"]["top"]) == 4 and report["kernels"]["total_ms"] > 0


def test_cli_profile_rt2_prints_the_rows():
    result = runner.invoke(app, ["profile", "--model", "rt2", "--size", "tiny", "--device", "cpu", "--top", "3",
                                 "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "prefill" in result.output and "decode" in result.output and "greedy tokens" in result.output


def test_bad_triton_options_are_refused():
    """A typo in a Triton option is an error naming the field and the allowed values, not a silent default;
    the removed variants (decode GEMV for o/down only) are refused too."""
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.errors import ConfigError

    with pytest.raises(ConfigError, match="TritonOptions.decode_gemv must be 'all' or 'off', got 'out'"):
        TritonOptions(decode_gemv="out")
    with pytest.raises(ConfigError, match="fused_combine must be 'grouped' or 'off', got 'yes'"):
        TritonOptions(fused_combine="yes")
    for name in ("fold_token_norms", "concurrent_stages", "decode_qkv_rope", "decode_head", "persistent_expert"):
        with pytest.raises(ConfigError, match=f"TritonOptions.{name} must be True or False, got 'on'"):
            TritonOptions(**{name: "on"})
        assert TritonOptions.parse(f"{name}=on").changed() == {}
        assert TritonOptions.parse(f" {name} = off ").changed() == {name: False}
    with pytest.raises(ConfigError, match=r"--triton-options: unknown Triton option\(s\) \['fold_norms'\]"):
        TritonOptions.parse("fold_norms=1")
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        TritonOptions.parse("pdl")
    with pytest.raises(ConfigError, match="decode_head must be 1 or 0"):
        TritonOptions.parse("decode_head=maybe")


def test_fused_combine_follows_the_lm_shape():
    """With fused_combine="grouped" the combine is fused in LMs whose query heads share KV heads (RT-2's Gemma:
    8 on 1) and not where each query head has its own (OpenVLA's Llama); "off" never fuses it."""
    pytest.importorskip("triton")
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.tools import token_model

    backend = TritonBackend(torch.device(TRITON_DEVICE), torch.float32)
    rt2, openvla = token_model("rt2", "real").lm, token_model("openvla", "real").lm
    assert (rt2.dims.num_heads, rt2.dims.num_kv_heads) == (8, 1)
    assert backend.fuses_combine(rt2.dims) and not backend.fuses_combine(openvla.dims)
    unfused = TritonBackend.configured(fused_combine="off")(torch.device(TRITON_DEVICE), torch.float32)
    assert not unfused.fuses_combine(rt2.dims)


def test_decode_key_preload_follows_the_lm_shape():
    """preload_decode_keys="grouped" (the default) preloads in RT-2's Gemma (8 query heads on 1 KV head) and not in
    OpenVLA's Llama; "off" in neither; any other value is refused."""
    pytest.importorskip("triton")
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.backends.triton_token_decoder import preloads_decode_keys
    from cortexflow.errors import ConfigError
    from cortexflow.tools import token_model

    rt2, openvla = token_model("rt2", "real").lm.dims, token_model("openvla", "real").lm.dims
    for mode, expected in (("grouped", (True, False)), ("off", (False, False))):
        backend = TritonBackend.configured(preload_decode_keys=mode)(torch.device(TRITON_DEVICE), torch.float32)
        assert (preloads_decode_keys(backend, rt2), preloads_decode_keys(backend, openvla)) == expected, mode
    with pytest.raises(ConfigError, match="preload_decode_keys must be 'grouped' or 'off', got 'all'"):
        TritonOptions(preload_decode_keys="all")


def test_norm_folding_runs_once_and_changes_the_fused_weights():
    """Folding scales the fused QKV / gate/up columns by the norm weight once (the folded scales become zeros,
    so a second pass scales by 1), leaves the reference's separate tensors alone, and keeps the layer's output
    (fp32) for the op-by-op composition too, which reads no marker."""
    pytest.importorskip("triton")
    from cortexflow.backends import create_backend
    from cortexflow.backends.triton_token_decoder import fold_norm_weights
    from cortexflow.tools import random_token_weights, token_model

    model = token_model("openvla", "tiny")
    weights = model.prepare_weights(random_token_weights(model, 3, torch.float32, torch.device(TRITON_DEVICE)))
    original_q = weights["llm.layers.0.q"].clone()
    backend = create_backend("triton", TRITON_DEVICE, torch.float32)
    folded = backend.prepare_weights(model, dict(weights))
    assert torch.equal(weights["llm.layers.0.q"], original_q)
    assert not folded[model.lm.gated_layer(0).attn_norm].any()
    scale = 1.0 + model.lm.norm_scale(weights, "llm.layers.0.attn_norm")
    assert torch.allclose(folded["llm.layers.0.qkv"][: original_q.shape[0]], original_q * scale, rtol=1e-6)
    again = fold_norm_weights(model.lm.layers(), folded)["llm.layers.0.qkv"][: original_q.shape[0]]
    assert torch.allclose(again, original_q * scale, rtol=1e-6)
    # The op-by-op reference layer on the folded dict (another backend handed the same weights) applies the
    # zeroed scales, so it computes what it computes on the original weights.
    reference = create_backend("pytorch", torch.device("cpu"), torch.float32)
    lm, d = model.lm, model.lm.dims
    width = folded["llm.layers.0.o"].shape[0]
    x = torch.randn(1, 5, width, generator=torch.Generator().manual_seed(4)).to(TRITON_DEVICE)
    positions = torch.arange(5, device=TRITON_DEVICE)[None]
    mask = torch.ones(1, 5, 5, dtype=torch.bool, device=TRITON_DEVICE).tril()

    def layer(w):
        cache = tuple(torch.zeros(d.num_layers, 1, 5, d.num_kv_heads, d.head_dim, device=TRITON_DEVICE) for _ in range(2))
        return lm.layer(reference, w, 0, x, positions, mask, cache, None)

    expected, got = layer(weights), layer(folded)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5

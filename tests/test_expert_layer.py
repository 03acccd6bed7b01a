"""The persistent expert-layer kernel (kernels/expert_layer.py) against its PyTorch reference.

CPU: Triton's interpreter runs one program (programs run one after another there, so a grid barrier
with more than one program would wait forever); the GPU runs the same tests with several programs, and
one at the real Pi0 expert size with the default tiling.
"""

import numpy as np
import pytest
import torch

from cortexflow.kernels import expert_layer as el
from cortexflow.kernels.rope import inverse_frequencies
from cortexflow.quantization.fp8 import quantize_weight
from expert_support import GPU_TILING_EXPERT, fp8_expert_backends
from compile_support import run_compile_script

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
#: Tiling of the small-config tests: the interpreter's on CPU; on the GPU the same work split with 8
#: persistent programs (so the grid barriers and last-arriver merges really wait for each other).
SMALL_TILING = el.INTERPRETER_TILING if not ON_GPU else el.ExpertTiling(
    block_m=16, pair=16, block_k=16, gate_up_cols=16, out_cols=16, o_splits=2, down_splits=2, attn_rows=16,
    attn_keys=16, attn_splits=2, attn_d_parts=4, attn_merge="last", attn_v_parts=1, programs=8, num_warps=4,
    num_stages=2)
BOUNDS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2**-8), torch.bfloat16: (1.5e-2, 2**-5)}


def _inputs(batch, seq, prefix, dim, mlp, heads, kv_heads, head_dim, dtype, seed, pi05):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    m = batch * seq
    tensors = dict(
        x=rnd(m, dim).to(dtype),
        w_qkv=rnd((heads + 2 * kv_heads) * head_dim, dim, scale=dim**-0.5).to(dtype),
        w_o=rnd(dim, heads * head_dim, scale=(heads * head_dim) ** -0.5).to(dtype),
        w_gate_up=rnd(2 * mlp, dim, scale=dim**-0.5).to(dtype),
        w_down=rnd(dim, mlp, scale=mlp**-0.5).to(dtype),
        attn_scale=1 + 0.2 * rnd(dim), mlp_scale=1 + 0.2 * rnd(dim),
    )
    offsets = torch.randint(0, prefix, (batch, 1), generator=g)
    positions = (torch.arange(seq)[None] + offsets).to(DEVICE)
    keys = rnd(batch, prefix + seq, kv_heads, head_dim).to(dtype)
    values = rnd(batch, prefix + seq, kv_heads, head_dim).to(dtype)
    prefix_mask = torch.rand(batch, prefix, generator=g) > 0.3
    prefix_mask[:, 0] = True
    suffix = torch.ones(seq, seq, dtype=torch.bool)
    suffix[0, 1:] = False  # Pi0's state token does not see the actions
    mask = torch.cat([prefix_mask[:, None].expand(batch, seq, prefix), suffix[None].expand(batch, seq, seq)], 2)
    extra = {}
    if pi05:
        extra = dict(attn_shift=0.3 * rnd(dim), mlp_shift=0.3 * rnd(dim), attn_gate=rnd(dim), mlp_gate=rnd(dim))
    inv_freq = inverse_frequencies(head_dim, 10000.0, torch.device(DEVICE))
    return tensors, positions, inv_freq, keys, values, mask.contiguous().to(DEVICE), extra


def _run(batch, seq, prefix, dim, mlp, heads, kv_heads, head_dim, dtype, pi05, inplace, tiling, seed=0):
    t, positions, inv_freq, keys, values, mask, extra = _inputs(batch, seq, prefix, dim, mlp, heads, kv_heads,
                                                                head_dim, dtype, seed, pi05)
    scale = head_dim**-0.5
    ref_keys, ref_values = keys.clone(), values.clone()
    reference = el.expert_layer_reference(t["x"], t["w_qkv"], t["w_o"], t["w_gate_up"], t["w_down"], t["attn_scale"],
                                          t["mlp_scale"], positions, inv_freq, ref_keys, ref_values, mask, 1e-6, scale,
                                          heads, **extra)
    work = el.ExpertWorkspace(batch * seq, seq, dim, mlp, heads, kv_heads, head_dim, prefix + seq, dtype,
                              torch.device(DEVICE), tiling)
    out = t["x"].clone() if inplace else torch.empty_like(t["x"])
    x = out if inplace else t["x"]
    el.expert_layer(x, out, t["w_qkv"], t["w_o"], t["w_gate_up"], t["w_down"], t["attn_scale"], t["mlp_scale"],
                    positions, inv_freq, keys, values, mask, 1e-6, scale, work, heads, **extra)
    return out, reference, (keys, ref_keys), (values, ref_values), work


def _assert_close(out, ref, dtype):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    rel_bound, ulp = BOUNDS[dtype]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= rel_bound, f"rel L2 {rel:.3e} > {rel_bound:.1e}"
    max_abs = (out - ref).abs().max().item()
    assert max_abs <= ulp * (ref.abs().max().item() + 1.0), f"max |d| {max_abs:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
@pytest.mark.parametrize("batch, inplace", [(1, False), (3, True)])
def test_expert_layer_matches_reference(dtype, pi05, batch, inplace):
    """Whole layer (norms, QKV + RoPE + cache write, masked attention over prefix + suffix, o + residual,
    gate/up + GELU gate, down + residual) on a small config: several row blocks at batch 3, partly masked
    prefixes, the output written in place of the input or into another buffer."""
    out, ref, keys, values, work = _run(batch, 6, 7, 32, 64, 4, 1, 32, dtype, pi05, inplace, SMALL_TILING)
    _assert_close(out, ref, dtype)
    _assert_close(keys[0], keys[1], dtype)
    _assert_close(values[0], values[1], dtype)
    # Every program passed every barrier; the attention merge's arrival counters are back at zero.
    assert work.sync[:7].tolist() == [work.programs] * 7 and int(work.counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [2, 4])
def test_logits_from_independent_column_parts(dtype, parts):
    """``attn_d_parts``: the attention logits summed from 2 or 4 products over column parts of the head (64
    wide here, so 4 parts are 16 columns each) give the reference layer, as one product does."""
    from dataclasses import replace

    tiling = replace(SMALL_TILING, attn_d_parts=parts)
    out, ref, keys, values, _ = _run(2, 5, 9, 32, 64, 4, 1, 64, dtype, True, False, tiling)
    _assert_close(out, ref, dtype)
    _assert_close(keys[0], keys[1], dtype)
    assert el.launch_constants(dtype, 32, 64, 4, 1, 64, True, True, False, _workspace(tiling, 64))["ATTN_D_PARTS"] \
        == parts
    # A 32-wide head has two 16-column parts at most.
    assert el.launch_constants(dtype, 32, 64, 4, 1, 32, True, True, False, _workspace(tiling, 32))["ATTN_D_PARTS"] \
        == min(parts, 2)


def _workspace(tiling, head_dim):
    return el.ExpertWorkspace(10, 5, 32, 64, 4, 1, head_dim, 14, torch.float32, torch.device(DEVICE), tiling)


def test_check_expert_shapes_refuses_other_logit_parts():
    from dataclasses import replace

    assert "attn_d_parts 3" in el.check_expert_shapes(1024, 4096, 8, 1, 256, replace(el.ExpertTiling(), attn_d_parts=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v_parts, splits, rows, merge_rows", [(1, 2, 16, None), (2, 3, 32, 8), (4, 2, 64, None),
                                                               (2, 1, 32, None)])
def test_attention_merge_phase(dtype, v_parts, splits, rows, merge_rows):
    """``attn_merge="phase"``: each key range stores its partials (``v_parts`` programs a tile, each with its part
    of the value columns; 4 parts of a 64-wide head are 16 columns each), and after a barrier of their own the
    programs merge ``merge_rows`` packed rows an item (8: three items over 20 rows, the last one partial; None: one
    wave's worth). The layer matches the reference; the merge barrier (the 8th counter) is passed by every program,
    and with one key range there is nothing to merge: the ranges write the output, the counter stays 0."""
    from dataclasses import replace

    tiling = replace(SMALL_TILING, attn_rows=rows, attn_splits=splits, attn_merge="phase", attn_v_parts=v_parts,
                     attn_merge_rows=merge_rows)
    assert el.check_expert_shapes(32, 64, 4, 1, 64, tiling) is None
    out, ref, keys, values, work = _run(2, 5, 40, 32, 64, 4, 1, 64, dtype, True, False, tiling)
    _assert_close(out, ref, dtype)
    _assert_close(values[0], values[1], dtype)
    assert work.n_splits == splits
    assert work.merge_rows == (merge_rows or max(2, el.next_power_of_two(-(-40 // work.programs))))
    assert work.sync[:7].tolist() == [work.programs] * 7
    assert work.sync[7].item() == (work.programs if splits > 1 else 0)


def test_check_expert_shapes_names_a_bad_attention_merge():
    from dataclasses import replace

    base = el.ExpertTiling()
    check = lambda **f: el.check_expert_shapes(1024, 4096, 8, 1, 256, replace(base, **f))  # noqa: E731
    assert "attn_merge 'first'" in check(attn_merge="first")
    assert "attn_v_parts 2" in check(attn_merge="last", attn_v_parts=2)  # value parts need the merge phase
    assert "attn_v_parts 3" in check(attn_merge="phase", attn_v_parts=3)
    assert "attn_merge_rows 6" in check(attn_merge="phase", attn_merge_rows=6)
    assert check(attn_merge="phase", attn_v_parts=4, attn_rows=64) is None
    # A 32-wide head has two value parts of 16 columns at most; a 64-wide one four.
    small = replace(el.INTERPRETER_TILING, attn_merge="phase", attn_v_parts=4)
    assert el.check_expert_shapes(32, 64, 4, 1, 32, small) is None
    assert el.launch_constants(torch.float32, 32, 64, 4, 1, 32, False, False, False, _workspace(small, 32))[
        "ATTN_V_PARTS"] == 2
    assert el.launch_constants(torch.float32, 32, 64, 4, 1, 64, False, False, False, _workspace(small, 64))[
        "ATTN_V_PARTS"] == 4


@pytest.mark.parametrize("merge", ["last", "phase"])
def test_expert_layer_with_grouped_kv_heads(merge):
    """Two KV heads of two query heads each, the key ranges merged by the last range program or in the merge phase
    (two value parts): every (batch, KV head) tile merges its own rows."""
    from dataclasses import replace

    tiling = SMALL_TILING if merge == "last" else replace(SMALL_TILING, attn_merge="phase", attn_v_parts=2)
    out, ref, keys, _, work = _run(2, 5, 30, 32, 64, 4, 2, 32, torch.float32, False, False, tiling)
    _assert_close(out, ref, torch.float32)
    _assert_close(keys[0], keys[1], torch.float32)
    assert work.n_splits == 2


def test_expert_layer_is_deterministic():
    """Split-K partials are summed in K-range order by the last arriver: two launches agree bit for bit."""
    first = _run(2, 6, 7, 32, 64, 4, 1, 32, torch.float32, True, False, SMALL_TILING, seed=3)[0]
    second = _run(2, 6, 7, 32, 64, 4, 1, 32, torch.float32, True, False, SMALL_TILING, seed=3)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_two_chained_layers_hand_the_down_projection_over(pi05):
    """Layer 1 leaves its down-projection as split-K partials (``finish=False``); layer 2 adds them to its
    input in place (``pending=True``, Pi0.5: with layer 1's gate) before its own norm: the pair equals the
    reference applied twice. Each launch uses its own barrier counters."""
    dtype = torch.float32
    t1, positions, inv_freq, keys1, values1, mask, extra1 = _inputs(2, 6, 7, 32, 64, 4, 1, 32, dtype, 5, pi05)
    t2, _, _, keys2, values2, _, extra2 = _inputs(2, 6, 7, 32, 64, 4, 1, 32, dtype, 6, pi05)
    scale = 32**-0.5
    args = lambda t: (t["w_qkv"], t["w_o"], t["w_gate_up"], t["w_down"], t["attn_scale"], t["mlp_scale"])  # noqa: E731
    r_keys1, r_values1, r_keys2, r_values2 = keys1.clone(), values1.clone(), keys2.clone(), values2.clone()
    ref = el.expert_layer_reference(t1["x"], *args(t1), positions, inv_freq, r_keys1, r_values1, mask, 1e-6, scale, 4,
                                    **extra1)
    ref = el.expert_layer_reference(ref, *args(t2), positions, inv_freq, r_keys2, r_values2, mask, 1e-6, scale, 4,
                                    **extra2)
    work = el.ExpertWorkspace(12, 6, 32, 64, 4, 1, 32, 13, dtype, torch.device(DEVICE), SMALL_TILING, launches=2)
    work.reset()
    out = torch.empty_like(t1["x"])
    el.expert_layer(t1["x"], out, *args(t1), positions, inv_freq, keys1, values1, mask, 1e-6, scale, work, 4,
                    launch=0, finish=False, **extra1)
    pending_gate = extra1.get("mlp_gate")
    el.expert_layer(out, out, *args(t2), positions, inv_freq, keys2, values2, mask, 1e-6, scale, work, 4, launch=1,
                    pending=True, pending_gate=pending_gate, **extra2)
    _assert_close(out, ref, dtype)
    _assert_close(keys2, r_keys2, dtype)
    with pytest.raises(ValueError, match="x must be out"):
        el.expert_layer(t1["x"], out, *args(t2), positions, inv_freq, keys2, values2, mask, 1e-6, scale, work, 4,
                        launch=1, pending=True)
    with pytest.raises(ValueError, match="launch 2 outside"):
        el.expert_layer(out, out, *args(t2), positions, inv_freq, keys2, values2, mask, 1e-6, scale, work, 4, launch=2)


WEIGHTS = ("w_qkv", "w_o", "w_gate_up", "w_down")


def _quantized(t):
    """The E4M3 data of the four weights of ``t`` and their per-output-channel scales."""
    q = [quantize_weight(t[n], n) for n in WEIGHTS]
    return [w.data for w in q], tuple(w.scale for w in q)


def _update_error(out, reference, x):
    """``‖out - reference‖ / ‖reference - x‖``: the error relative to what the layer adds to its input."""
    out, reference, x = out.float(), reference.float(), x.float()
    return ((out - reference).norm() / (reference - x).norm()).item()


#: The FP8 GEMM form with the weights as the MMA's first operand.
WEIGHTS_FIRST = {"fp8_weights_first": True}


@pytest.mark.parametrize("dtype, operands, forms", [
    (torch.float32, "bf16", {}), (torch.bfloat16, "bf16", {}), (torch.bfloat16, "f16", {}),
    (torch.float32, "bf16", WEIGHTS_FIRST), (torch.bfloat16, "f16", WEIGHTS_FIRST), (torch.bfloat16, "bf16", WEIGHTS_FIRST)],
    ids=["fp32", "bf16", "f16", "fp32-weights-first", "f16-weights-first", "bf16-weights-first"])
@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_fp8_weights_match_the_dequantised_reference(dtype, operands, forms, pi05):
    """E4M3 weights with per-output-channel scales: the kernel computes the reference layer on the
    dequantised weights (fp32: up to summation order), and differs from the layer on the unquantised
    weights by E4M3's rounding (a few percent of the layer's update: neither scales left out, which
    multiplies the update by ~448 / amax, nor applied twice, which shrinks it to ~0). With
    ``fp8_operands="f16"`` the rows QKV, o and gate/up multiply are float16 (the workspace's) and within the same
    bounds; so is the GEMM form with the weights as the MMA's first operand (``fp8_weights_first``)."""
    from dataclasses import replace

    t, positions, inv_freq, keys, values, mask, extra = _inputs(3, 6, 7, 32, 64, 4, 1, 32, dtype, 11, pi05)
    data, scales = _quantized(t)
    norms = (t["attn_scale"], t["mlp_scale"], positions, inv_freq)
    ref_keys, ref_values = keys.clone(), values.clone()
    ref = el.expert_layer_reference(t["x"], *data, *norms, ref_keys, ref_values, mask, 1e-6, 32**-0.5, 4,
                                    weight_scales=scales, **extra)
    plain = el.expert_layer_reference(t["x"], *(t[n] for n in WEIGHTS), *norms, keys.clone(), values.clone(), mask,
                                      1e-6, 32**-0.5, 4, **extra)
    tiling = replace(SMALL_TILING, fp8_operands=operands, **forms)
    work = el.ExpertWorkspace(18, 6, 32, 64, 4, 1, 32, 13, dtype, torch.device(DEVICE), tiling)
    assert (work.normed_attn.dtype, work.normed_mlp.dtype, work.attn.dtype, work.h.dtype) == (
        (torch.float16,) * 3 + (dtype,) if operands == "f16" else (dtype,) * 4)
    out = t["x"].clone()
    el.expert_layer(out, out, *data, *norms, keys, values, mask, 1e-6, 32**-0.5, work, 4, weight_scales=scales, **extra)
    _assert_close(out, ref, dtype)
    _assert_close(keys, ref_keys, dtype)
    _assert_close(values, ref_values, dtype)
    if dtype == torch.float32:
        assert _update_error(out, ref, t["x"]) < 1e-5
    assert 1e-2 < _update_error(out, plain, t["x"]) < 1e-1


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_two_chained_fp8_layers(pi05):
    """The split-K hand-over between two launches with E4M3 weights: the scaled down-projection partials of
    layer 1 are added by layer 2 (fp32 activations, so the comparison is tight)."""
    dtype = torch.float32
    t1, positions, inv_freq, keys1, values1, mask, extra1 = _inputs(2, 6, 7, 32, 64, 4, 1, 32, dtype, 12, pi05)
    t2, _, _, keys2, values2, _, extra2 = _inputs(2, 6, 7, 32, 64, 4, 1, 32, dtype, 13, pi05)
    (data1, scales1), (data2, scales2) = _quantized(t1), _quantized(t2)
    scale = 32**-0.5
    r_keys1, r_values1, r_keys2, r_values2 = keys1.clone(), values1.clone(), keys2.clone(), values2.clone()
    ref = el.expert_layer_reference(t1["x"], *data1, t1["attn_scale"], t1["mlp_scale"], positions, inv_freq, r_keys1,
                                    r_values1, mask, 1e-6, scale, 4, weight_scales=scales1, **extra1)
    ref = el.expert_layer_reference(ref, *data2, t2["attn_scale"], t2["mlp_scale"], positions, inv_freq, r_keys2,
                                    r_values2, mask, 1e-6, scale, 4, weight_scales=scales2, **extra2)
    work = el.ExpertWorkspace(12, 6, 32, 64, 4, 1, 32, 13, dtype, torch.device(DEVICE), SMALL_TILING, launches=2)
    work.reset()
    out = torch.empty_like(t1["x"])
    el.expert_layer(t1["x"], out, *data1, t1["attn_scale"], t1["mlp_scale"], positions, inv_freq, keys1, values1,
                    mask, 1e-6, scale, work, 4, launch=0, finish=False, weight_scales=scales1, **extra1)
    el.expert_layer(out, out, *data2, t2["attn_scale"], t2["mlp_scale"], positions, inv_freq, keys2, values2, mask,
                    1e-6, scale, work, 4, launch=1, pending=True, pending_gate=extra1.get("mlp_gate"),
                    weight_scales=scales2, **extra2)
    _assert_close(out, ref, dtype)
    _assert_close(keys1, r_keys1, dtype)
    _assert_close(keys2, r_keys2, dtype)


def test_f16_operands_are_for_fp8_weights_and_saturate():
    """``fp8_operands="f16"`` with bf16 weights is refused (the bf16 GEMMs cannot take float16 rows);
    ``check_expert_shapes`` names an unknown setting; a norm row beyond float16's range is stored saturated at
    ±65504, never as inf."""
    from dataclasses import replace

    tiling = replace(SMALL_TILING, fp8_operands="f16")
    t, positions, inv_freq, keys, values, mask, _ = _inputs(1, 6, 7, 32, 64, 4, 1, 32, torch.bfloat16, 15, False)
    work = el.ExpertWorkspace(6, 6, 32, 64, 4, 1, 32, 13, torch.bfloat16, torch.device(DEVICE), tiling)
    with pytest.raises(ValueError, match="fp8_operands='f16' is for E4M3 weights"):
        el.expert_layer(t["x"], torch.empty_like(t["x"]), *(t[n] for n in WEIGHTS), t["attn_scale"], t["mlp_scale"],
                        positions, inv_freq, keys, values, mask, 1e-6, 32**-0.5, work, 4)
    assert "fp8_operands 'fp16'" in el.check_expert_shapes(1024, 4096, 8, 1, 256,
                                                          replace(el.ExpertTiling(), fp8_operands="fp16"))
    data, scales = _quantized(t)
    huge = t["attn_scale"].clone()
    huge[:4] = 1e6  # the attention norm's first columns far beyond float16
    el.expert_layer(t["x"].clone(), torch.empty_like(t["x"]), *data, huge, t["mlp_scale"], positions, inv_freq,
                    keys.clone(), values.clone(), mask, 1e-6, 32**-0.5, work, 4, weight_scales=scales)
    rows = work.normed_attn.float()
    assert torch.isfinite(rows).all() and rows[:, :4].abs().max().item() == 65504.0


def test_fp8_weights_need_all_four_and_their_scales():
    t, positions, inv_freq, keys, values, mask, _ = _inputs(1, 6, 7, 32, 64, 4, 1, 32, torch.float32, 14, False)
    data, scales = _quantized(t)
    work = el.ExpertWorkspace(6, 6, 32, 64, 4, 1, 32, 13, torch.float32, torch.device(DEVICE), SMALL_TILING)
    rest = (t["attn_scale"], t["mlp_scale"], positions, inv_freq, keys, values, mask, 1e-6, 32**-0.5, work, 4)
    out = torch.empty_like(t["x"])
    with pytest.raises(ValueError, match="all four weights in E4M3 or none"):
        el.expert_layer(t["x"], out, data[0], t["w_o"], *data[2:], *rest, weight_scales=scales)
    with pytest.raises(ValueError, match="need weight_scales"):
        el.expert_layer(t["x"], out, *data, *rest)
    with pytest.raises(ValueError, match="are for E4M3 weights"):
        el.expert_layer(t["x"], out, *(t[n] for n in WEIGHTS), *rest, weight_scales=scales)
    with pytest.raises(ValueError, match=r"scales of w_o \(32, 128\)"):
        el.expert_layer(t["x"], out, *data, *rest, weight_scales=(scales[0], scales[0], *scales[2:]))


def test_check_expert_shapes_names_what_does_not_fit():
    assert el.check_expert_shapes(1024, 4096, 8, 1, 256, el.ExpertTiling()) is None
    assert "head_dim 72" in el.check_expert_shapes(1024, 4096, 8, 1, 72, el.ExpertTiling())
    assert "MLP width 4000" in el.check_expert_shapes(1024, 4000, 8, 1, 256, el.ExpertTiling())
    assert "K ranges" in el.check_expert_shapes(1024, 4096, 2, 1, 256, el.ExpertTiling())


def test_backend_falls_back_for_an_expert_the_kernel_was_not_written_for(tmp_path):
    """A head size the kernel's RoPE tiles do not divide: one warning naming the op, reference numbers."""
    import cortexflow as cf
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    config = tiny_model_config("pi0", head_dim=12, chunk_size=3, num_diffusion_steps=2, num_vision_layers=1,
                               image_size=56)
    write_checkpoint(tmp_path, config)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    noise = rng.standard_normal((3, 8)).astype(np.float32)
    state = rng.standard_normal(5)
    outputs = {}
    for backend in ("pytorch", "triton"):
        engine = cf.create_pi0_inference(tmp_path, backend=backend, device=DEVICE, dtype="float32",
                                         model_config=config, use_cuda_graphs=False)
        if backend == "triton":
            with pytest.warns(cf.CortexFlowWarning, match="persistent expert layer falls back .*head_dim 12"):
                outputs[backend] = engine.predict(images, prompt_tokens=[2, 7], state=state, noise=noise)
        else:
            outputs[backend] = engine.predict(images, prompt_tokens=[2, 7], state=state, noise=noise)
    rel = np.linalg.norm(outputs["triton"] - outputs["pytorch"]) / np.linalg.norm(outputs["pytorch"])
    assert rel <= 1e-5


def test_backend_runs_fp8_expert_weights_in_the_persistent_kernel(tmp_path):
    """A tiny Pi0 in fp32 whose fused expert projections are E4M3: the triton backend's actions equal the
    PyTorch backend's on the dequantised weights (fp32 bound), and differ from the unquantised model's by
    E4M3's rounding."""
    import cortexflow as cf
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    fp8_triton, dequantised = fp8_expert_backends()
    config = tiny_model_config("pi0", chunk_size=3, num_diffusion_steps=2, num_vision_layers=1, image_size=56,
                               **(GPU_TILING_EXPERT if ON_GPU else {}))
    write_checkpoint(tmp_path, config)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    noise = rng.standard_normal((3, 8)).astype(np.float32)
    state = rng.standard_normal(5)

    def predict(backend):
        engine = cf.create_pi0_inference(tmp_path, backend=backend, device=DEVICE, dtype="float32",
                                         model_config=config, use_cuda_graphs=False)
        return engine.predict(images, prompt_tokens=[2, 7], state=state, noise=noise)

    fp8 = predict(fp8_triton)
    reference = predict(dequantised)
    plain = predict("pytorch")
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(fp8, reference) <= 1e-4
    assert 5e-3 < rel(fp8, plain) < 5e-2


def test_backend_refuses_fp8_expert_weights_without_the_persistent_kernel():
    """The kernel chain's cuBLAS GEMMs cannot take E4M3 weights: ``begin_denoising`` says what to switch on
    (and, on a GPU without E4M3 conversion, what is missing) before any kernel runs."""
    from cortexflow.errors import ConfigError
    from cortexflow.models.pi0 import Pi0Model
    from cortexflow.random_checkpoint import random_weights, tiny_model_config

    from cortexflow.kernels import runtime

    fp8_triton, _ = fp8_expert_backends()
    config = tiny_model_config("pi0", **GPU_TILING_EXPERT)
    model = Pi0Model(config)
    chain = fp8_triton.configured(persistent_expert=False)(torch.device(DEVICE), torch.float32)
    weights = chain.prepare_weights(model, random_weights(config))
    with pytest.raises(ConfigError, match=r"persistent_expert=True"):
        chain.begin_denoising(weights, model.expert(), None, [], None, None, 3, 2)
    previous = runtime.set_compile_target(runtime.CompileTarget(arch=80))  # an A100 that a meta device stands for
    try:
        ampere = fp8_triton(torch.device("meta"), torch.float32)
        with pytest.raises(ConfigError, match=r"compute capability 8.9 .* has 8.0"):
            ampere.begin_denoising(weights, model.expert(), None, [], None, None, 3, 2)
    finally:
        runtime.set_compile_target(previous)


FP8_COMPILE_SCRIPT = r"""
import json, re, sys, torch
from cortexflow.kernels import expert_layer as el
from cortexflow.kernels.runtime import CompileTarget
from cortexflow.quantization.fp8 import E4M3
from cortexflow.tools.compile_check import compile_only

meta = torch.device("meta")
m, s, p, d, f, h, hkv, hd = 51, 51, 300, 1024, 4096, 8, 1, 256
bf16, fp32 = torch.bfloat16, torch.float32
e = lambda *shape, dtype=bf16: torch.empty(*shape, dtype=dtype, device=meta)
weights = (e((h + 2 * hkv) * hd, d, dtype=E4M3), e(d, h * hd, dtype=E4M3), e(2 * f, d, dtype=E4M3), e(d, f, dtype=E4M3))
scales = tuple(e(w.shape[0], dtype=fp32) for w in weights)
f16_bits = {"fp8_operands": "f16", "fp8_convert": "bits"}
VARIANTS = {"bf16 cvt": {}, "f16 cvt": {"fp8_operands": "f16"}, "f16 bits": f16_bits,
            "first": {**f16_bits, "fp8_weights_first": True}}
out = {}
for arch, sms in ((89, 58), (90, 132)):  # an L4 and an H100
    for variant, fields in VARIANTS.items():
        with compile_only(CompileTarget(arch=arch, processors=sms)) as launches:
            tiling = el.ExpertTiling(**fields)
            work = el.ExpertWorkspace(m, s, d, f, h, hkv, hd, p + s, bf16, meta, tiling)
            el.expert_layer(e(m, d), e(m, d), *weights, e(d, dtype=fp32), e(d, dtype=fp32),
                            e(1, s, dtype=torch.int64), e(hd // 2, dtype=fp32), e(1, p + s, hkv, hd),
                            e(1, p + s, hkv, hd), e(1, s, p + s, dtype=torch.bool), 1e-6, hd**-0.5, work, h,
                            weight_scales=scales)
        out[f"{arch} {variant}"] = [
            {"name": l.name, "grid": list(l.grid), "fp8": l.constexprs.get("FP8"), "shared": l.kernel.metadata.shared,
             "ptx_e4m3_cvt": "cvt.rn.f16x2.e4m3x2" in l.kernel.asm["ptx"],
             "f16_products": "f32.f16.f16" in l.kernel.asm["ptx"],
             "bf16_fmas": l.kernel.asm["ptx"].count("fma.rn.bf16x2"),
             "f16_to_bf16": l.kernel.asm["ptx"].count("cvt.bf16.f16") + l.kernel.asm["ptx"].count("cvt.f32.f16"),
             "mma_sync_f16": l.kernel.asm["ptx"].count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16"),
             "wgmma_f16_registers": len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n64k16\.f32\.f16\.f16 "
                                                   r"\{[^}]*\}, \{", l.kernel.asm["ptx"])),
             "conversions": l.kernel.asm["ptx"].count("cvt.")}
            for l in launches]
json.dump(out, sys.stdout)
"""


def test_fp8_expert_layer_compiles_for_ada_and_hopper(tmp_path):
    """The kernel with E4M3 weights through Triton's whole pipeline for sm_89 (an L4's 58 SMs) and sm_90 (an
    H100's 132) at Pi0's expert size on ``meta`` tensors (compile-check's compile-only launches, in a subprocess
    without the interpreter): one program per SM, shared memory within the architecture's per-program limit, and
    its PTX converts E4M3 pairs in hardware. With ``fp8_operands="f16"`` it multiplies float16 tiles and has fewer
    conversion instructions (the weights' E4M3 -> f16 -> bf16 chain ends at f16); with ``fp8_convert="bits"`` too,
    the down projection's f16 -> bf16 conversions are bf16 FMAs (one a pair) and fewer conversions remain. With the
    weights first (the backend's FP8 tiling) the f16 products are ``mma.sync`` with the weights in registers."""
    from cortexflow.tools.compile_check import SM_LIMITS

    report = run_compile_script(FP8_COMPILE_SCRIPT, tmp_path)
    for arch, sms in ((89, 58), (90, 132)):
        for variant, mode in (("bf16 cvt", 1), ("f16 cvt", 1), ("f16 bits", 1 | el.FP8_BITS),
                              ("first", 1 | el.FP8_BITS | el.FP8_WEIGHTS_FIRST)):
            (launch,) = report[f"{arch} {variant}"]
            assert launch["name"] == "_expert_layer_kernel" and launch["grid"] == [sms] and launch["fp8"] == mode
            assert launch["ptx_e4m3_cvt"] and launch["shared"] <= SM_LIMITS[arch].program_shared, (arch, launch)
        bf16, f16, bits = (report[f"{arch} {v}"][0] for v in ("bf16 cvt", "f16 cvt", "f16 bits"))
        assert f16["f16_products"] and not bf16["f16_products"] and bits["f16_products"]
        assert f16["conversions"] < bf16["conversions"], (arch, bf16["conversions"], f16["conversions"])
        assert bits["conversions"] < f16["conversions"] and not f16["bf16_fmas"] and bits["bf16_fmas"], (arch, bits)
        assert bits["f16_to_bf16"] < f16["f16_to_bf16"], (arch, f16["f16_to_bf16"], bits["f16_to_bf16"])
        first = report[f"{arch} first"][0]
        assert first["mma_sync_f16"] > 0 and not first["wgmma_f16_registers"], (arch, first)


@pytest.mark.skipif(not ON_GPU, reason="real-size run with every SM as a persistent program needs a CUDA GPU "
                                       "(the interpreter runs programs one after another)")
@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_expert_layer_real_size(pi05):
    """Pi0's expert (D 1024, MLP 4096, 8 heads of 256 on 1 KV head), 51 suffix rows after a 300-token
    prefix, bf16, the default tiling (one program per SM)."""
    out, ref, keys, values, work = _run(1, 51, 300, 1024, 4096, 8, 1, 256, torch.bfloat16, pi05, True, None)
    _assert_close(out, ref, torch.bfloat16)
    _assert_close(keys[0], keys[1], torch.bfloat16)
    assert int(work.counters.abs().sum()) == 0


@pytest.mark.skipif(not ON_GPU, reason="counts the SMs of a CUDA GPU")
def test_workspace_refuses_more_programs_than_sms():
    from dataclasses import replace

    from cortexflow.kernels.runtime import processor_count

    too_many = replace(SMALL_TILING, programs=processor_count(torch.device(DEVICE)) + 1)
    with pytest.raises(ValueError, match="at most one per SM"):
        el.ExpertWorkspace(6, 6, 32, 64, 4, 1, 32, 13, torch.float32, torch.device(DEVICE), too_many)

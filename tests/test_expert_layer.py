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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
#: Tiling of the small-config tests: the interpreter's on CPU; on the GPU the same work split with 8
#: persistent programs (so the grid barriers and last-arriver merges really wait for each other).
SMALL_TILING = el.INTERPRETER_TILING if not ON_GPU else el.ExpertTiling(
    block_m=16, pair=16, block_k=16, gate_up_cols=16, out_cols=16, o_splits=2, down_splits=2, attn_rows=16,
    attn_keys=16, attn_splits=2, programs=8, num_warps=4, num_stages=2)
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


def test_expert_layer_with_grouped_kv_heads():
    out, ref, keys, _, _ = _run(2, 5, 9, 32, 64, 4, 2, 32, torch.float32, False, False, SMALL_TILING)
    _assert_close(out, ref, torch.float32)
    _assert_close(keys[0], keys[1], torch.float32)


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


def test_check_expert_shapes_names_what_does_not_fit():
    assert el.check_expert_shapes(1024, 4096, 8, 1, 256, el.ExpertTiling()) is None
    assert "head_dim 72" in el.check_expert_shapes(1024, 4096, 8, 1, 72, el.ExpertTiling())
    assert "MLP width 4000" in el.check_expert_shapes(1024, 4000, 8, 1, 256, el.ExpertTiling())
    assert "K ranges" in el.check_expert_shapes(1024, 4096, 2, 1, 256, el.ExpertTiling())


def test_backend_falls_back_for_an_expert_the_kernel_was_not_written_for(tmp_path):
    """A head size the kernel's RoPE tiles do not divide: one warning naming the op, reference numbers."""
    import cortexflow as cf
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    config = tiny_model_config("pi0", head_dim=12, chunk_size=3, num_diffusion_steps=2, num_vision_layers=1)
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

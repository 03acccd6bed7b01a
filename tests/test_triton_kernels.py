"""Each Triton kernel against its PyTorch reference (CPU: Triton interpreter; GPU: real kernels).

Shapes exercise the masking paths: widths and head dims that are not powers of two, token counts
that are not multiples of the block, several query heads per KV head, fully masked query rows.
fp32 must match to rounding; fp16 to fp16 precision; bf16 within a couple of bf16 ulps (the
interpreter truncates fp32->bf16 casts).
"""

import numpy as np
import pytest
import torch



from cortexflow.kernels.attention import attention, attention_reference  # noqa: E402
from cortexflow.kernels.gelu_gate import (  # noqa: E402
    gelu_tanh,
    gelu_tanh_gate,
    gelu_tanh_gate_fused,
    silu_gate_fused,
    silu_gate_reference,
    gelu_tanh_gate_reference,
)
from cortexflow.kernels.layer_norm import layer_norm, layer_norm_reference  # noqa: E402
from cortexflow.kernels.qkv_rope import qkv_rope, qkv_rope_reference  # noqa: E402
from cortexflow.kernels.rms_norm import rms_norm, rms_norm_reference, rms_rstd, rms_rstd_reference  # noqa: E402
from cortexflow.kernels.rope import inverse_frequencies, rope, rope_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(out, ref, dtype):
    """Relative L2 and element-wise bounds scaled to the dtype's precision."""
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert rel <= bound, f"rel L2 {rel:.3e} > {bound:.1e}"
    ulp = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}[dtype]
    max_abs = (out - ref).abs().max().item()
    assert max_abs <= ulp * (ref.abs().max().item() + 1.0), f"max |d| {max_abs:.3e}"


def randn(*shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 72), (3, 3, 16), (8, 2, 40)])
def test_attention_with_mask_and_mqa(dtype, heads, kv_heads, head_dim):
    q = randn(2, 37, heads, head_dim, dtype=dtype, seed=1)
    k = randn(2, 70, kv_heads, head_dim, dtype=dtype, seed=2)
    v = randn(2, 70, kv_heads, head_dim, dtype=dtype, seed=3)
    generator = torch.Generator().manual_seed(4)
    mask = (torch.rand(2, 37, 70, generator=generator) > 0.4).to(DEVICE)
    mask[1, 3] = False  # a query that sees nothing: uniform average, as the reference
    scale = head_dim**-0.5
    assert_close(attention(q, k, v, mask, scale), attention_reference(q, k, v, mask, scale), dtype)
    assert_close(attention(q, k, v, None, scale), attention_reference(q, k, v, None, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [2, 3, 40])
@pytest.mark.parametrize("fused_combine", [False, True])
def test_attention_split_keys_matches(dtype, num_splits, fused_combine):
    """Split-KV (flash-decoding) with the log-sum-exp combine (a second kernel, or the last-arriving range
    program): ranges of unequal fill, a range whose keys are all masked for some rows, a row that sees
    nothing at all, and more splits asked than key blocks."""
    q = randn(2, 11, 8, 48, dtype=dtype, seed=11)
    k = randn(2, 300, 1, 48, dtype=dtype, seed=12)
    v = randn(2, 300, 1, 48, dtype=dtype, seed=13)
    generator = torch.Generator().manual_seed(14)
    mask = (torch.rand(2, 11, 300, generator=generator) > 0.3).to(DEVICE)
    mask[0, :4, :200] = False  # the first ranges see nothing for these rows
    mask[1, 5] = False
    scale = 48**-0.5
    ref = attention_reference(q, k, v, mask, scale)
    assert_close(attention(q, k, v, mask, scale, num_splits=num_splits, fused_combine=fused_combine), ref, dtype)
    assert_close(attention(q, k, v, None, scale, num_splits=num_splits, fused_combine=fused_combine),
                 attention_reference(q, k, v, None, scale), dtype)


@pytest.mark.parametrize("block_m, combine_block_m", [(16, 4), (32, 16), (64, 64)])
def test_attention_tiling_knobs_keep_the_result(block_m, combine_block_m):
    """The tuning knobs (rows per attention program, rows per combine program) change the tiling only:
    88 packed rows (11 queries x 8 heads) over 16/32/64-row tiles, with split keys, and a single-token
    decode step without GQA (1 row per KV head)."""
    q = randn(2, 11, 8, 48, dtype=torch.float32, seed=31)
    k = randn(2, 150, 1, 48, dtype=torch.float32, seed=32)
    v = randn(2, 150, 1, 48, dtype=torch.float32, seed=33)
    mask = (torch.rand(2, 11, 150, generator=torch.Generator().manual_seed(34)) > 0.3).to(DEVICE)
    scale = 48**-0.5
    out = attention(q, k, v, mask, scale, num_splits=3, fused_combine=False, block_m=block_m,
                    combine_block_m=combine_block_m)
    assert_close(out, attention_reference(q, k, v, mask, scale), torch.float32)
    q1 = randn(1, 1, 4, 32, dtype=torch.float32, seed=35)
    k1, v1 = randn(1, 70, 4, 32, dtype=torch.float32, seed=36), randn(1, 70, 4, 32, dtype=torch.float32, seed=37)
    mask1 = torch.arange(70, device=DEVICE)[None, None, :] <= 60
    out1 = attention(q1, k1, v1, mask1, 32**-0.5, num_splits=2, block_m=block_m, combine_block_m=combine_block_m)
    assert_close(out1, attention_reference(q1, k1, v1, mask1, 32**-0.5), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,num_splits,fresh", [
    (4, 4, 32, 5, 61),    # OpenVLA-like: one query row a KV head, one key block a range, fresh row in range 3
    (8, 1, 64, 2, 0),     # RT-2-like: 8 query heads on one KV head, ranges of several blocks, fresh row first
    (4, 2, 40, 1, 149),   # unsplit keys, fresh row the last key
])
def test_attention_with_a_fresh_row_matches(dtype, heads, kv_heads, head_dim, num_splits, fresh):
    """A decode step's attention with ``fresh_row``: each range's first key block, its values and mask entries
    are read before the PDL wait, the fresh row's key and value after it. Without PDL (here) the result must be
    the plain attention's, whichever range holds the fresh row: the masked loads of the settled rows and the
    fresh row's fill exactly one entry each."""
    q = randn(2, 1, heads, head_dim, dtype=dtype, seed=41)
    k = randn(2, 150, kv_heads, head_dim, dtype=dtype, seed=42)
    v = randn(2, 150, kv_heads, head_dim, dtype=dtype, seed=43)
    position = torch.tensor([fresh], device=DEVICE)
    visible = torch.arange(150, device=DEVICE)[None, :] <= max(fresh, 100)
    mask = visible[:, None, :].expand(2, 1, 150)
    scale = head_dim**-0.5
    ref = attention_reference(q, k, v, mask, scale)
    plain = attention(q, k, v, mask, scale, num_splits=num_splits, block_n=32)
    out = attention(q, k, v, mask, scale, num_splits=num_splits, block_n=32, fresh_row=position)
    assert_close(out, ref, dtype)
    # bf16 to the bit; fp32 within rounding (on the GPU the preloaded block's products may round differently).
    assert torch.equal(out, plain) if dtype == torch.bfloat16 else torch.allclose(out, plain, rtol=1e-5, atol=1e-6)


def test_attention_refuses_a_fresh_row_that_is_not_one_integer():
    q = randn(1, 1, 2, 16, dtype=torch.float32, seed=44)
    k = v = randn(1, 20, 2, 16, dtype=torch.float32, seed=45)
    with pytest.raises(ValueError, match="fresh_row must be one integer"):
        attention(q, k, v, None, 0.25, fresh_row=torch.tensor([1, 2], device=DEVICE))


def test_fused_combine_leaves_its_counters_at_zero():
    """The last-arriving range program resets its arrival counter, so a second call (as in a CUDA graph
    replay) starts from zero and merges again; a counter left non-zero would skip or repeat the merge."""
    from cortexflow.kernels.attention import arrival_counters

    q = randn(1, 51, 8, 32, dtype=torch.float32, seed=21)
    k = randn(1, 200, 1, 32, dtype=torch.float32, seed=22)
    v = randn(1, 200, 1, 32, dtype=torch.float32, seed=23)
    scale = 32**-0.5
    ref = attention_reference(q, k, v, None, scale)
    counters = arrival_counters(q.device, 1)
    counters.fill_(0)
    for _ in range(2):
        out = attention(q, k, v, None, scale, num_splits=4, fused_combine=True)
        assert_close(out, ref, torch.float32)
        assert int(counters.abs().sum()) == 0


def test_choose_splits_fills_the_gpu_only_for_small_grids():
    from cortexflow.kernels.attention import choose_splits

    assert choose_splits(row_blocks=26, k_len=611, block_n=32, processors=132) == 6  # the denoising step, 16-row tiles
    assert choose_splits(row_blocks=32, k_len=290, block_n=64, processors=132) == 5  # OpenVLA decode: 1 block a range
    assert choose_splits(row_blocks=70, k_len=560, block_n=32, processors=132) == 1  # the prefix
    assert choose_splits(row_blocks=2, k_len=30, block_n=32, processors=132) == 1  # one key block: nothing to split


def test_attention_reads_strided_views():
    """K/V given as slices of a larger cache and Q as a view of a fused projection."""
    cache = randn(1, 90, 1, 32, dtype=torch.float32, seed=5)
    fused = randn(1, 20, 6 * 32, dtype=torch.float32, seed=6)
    q = fused.view(1, 20, 6, 32)[:, :, :4]
    k, v = cache[:, :50], cache[:, 40:90]
    assert_close(attention(q, k, v, None, 0.2), attention_reference(q, k, v, None, 0.2), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_plain_and_adaptive(dtype):
    x = randn(2, 9, 200, dtype=dtype, seed=7)
    w = randn(200, dtype=torch.float32, seed=8)
    assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)
    assert_close(rms_norm(x, None, 1e-6), rms_norm_reference(x, None, 1e-6), dtype)
    scale, shift = randn(2, 200, dtype=torch.float32, seed=9), randn(2, 200, dtype=torch.float32, seed=10)
    assert_close(rms_norm(x, None, 1e-6, scale, shift), rms_norm_reference(x, None, 1e-6, scale, shift), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_rstd_per_row(dtype):
    """The folded norm's statistics kernel: one fp32 value per row (odd width, rows of different scale)."""
    x = randn(2, 3, 1100, dtype=dtype, seed=30) * torch.arange(1, 7, device=DEVICE).view(2, 3, 1).to(dtype)
    rstd = rms_rstd(x, 1e-6)
    assert rstd.shape == (6,) and rstd.dtype == torch.float32
    assert_close(rstd, rms_rstd_reference(x, 1e-6), torch.float32 if dtype == torch.float32 else torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    x = randn(3, 11, 72, dtype=dtype, seed=11) * 3 + 1
    w, b = randn(72, dtype=dtype, seed=12), randn(72, dtype=dtype, seed=13)
    assert_close(layer_norm(x, w, b, 1e-6), layer_norm_reference(x, w, b, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True], ids=["add", "layer-scale"])
def test_add_layer_norm_updates_the_stream_in_place(dtype, scaled):
    """The Triton backend's ``add_layer_norm``: the residual (times DINOv2's LayerScale) added to the stream in place
    by the LayerNorm kernel; the sum equals ``x + y`` / ``torch.addcmul`` (one rounding) and the normalised rows the
    reference's, as the default composition (PyTorch backend) computes them."""
    from cortexflow.backends.pytorch import PyTorchBackend
    from cortexflow.backends.triton_backend import TritonBackend

    x = randn(2, 9, 1040, dtype=dtype, seed=41) * 2
    y = randn(2, 9, 1040, dtype=dtype, seed=42)
    w, b = randn(1040, dtype=dtype, seed=43), randn(1040, dtype=dtype, seed=44)
    scale = randn(1040, dtype=dtype, seed=45) * 0.1 if scaled else None
    stream = x.clone()
    s, normed = TritonBackend(torch.device(DEVICE), dtype).add_layer_norm(stream, y, w, b, 1e-6, scale)
    ref_s, ref_normed = PyTorchBackend(torch.device(DEVICE), dtype).add_layer_norm(x, y, w, b, 1e-6, scale)
    assert s.data_ptr() == stream.data_ptr()
    assert_close(s, ref_s, dtype)
    assert_close(normed, ref_normed, dtype)
    assert_close(normed, layer_norm_reference(x, w, b, 1e-6, residual=y, residual_scale=scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_into_a_cache_slice(dtype):
    x = randn(2, 7, 3, 48, dtype=dtype, seed=14)
    positions = torch.tensor([[0, 1, 2, 5, 6, 9, 700], [3, 4, 5, 6, 7, 8, 9]], device=DEVICE)
    inv = inverse_frequencies(48, 10000.0, torch.device(DEVICE))
    expected = rope_reference(x, positions, inv)
    assert_close(rope(x, positions, inv), expected, dtype)
    cache = torch.full((2, 12, 3, 48), float("nan"), dtype=dtype, device=DEVICE)
    rope(x, positions, inv, out=cache[:, 4:11])
    assert_close(cache[:, 4:11], expected, dtype)
    assert torch.isnan(cache[:, :4]).all() and torch.isnan(cache[:, 11:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_gate(dtype):
    gate, up = randn(3, 5, 300, dtype=dtype, seed=15), randn(3, 5, 300, dtype=dtype, seed=16)
    assert_close(gelu_tanh_gate(gate, up), gelu_tanh_gate_reference(gate, up), dtype)
    fused = torch.cat([gate, up], -1)
    assert_close(gelu_tanh_gate_fused(fused), gelu_tanh_gate_reference(gate, up), dtype)
    expected = torch.nn.functional.gelu(gate.float(), approximate="tanh").to(dtype)
    assert_close(gelu_tanh(gate), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gate(dtype):
    """Llama's ``silu(gate) * up`` from the fused ``[gate | up]`` GEMM output (odd width: masking)."""
    gate, up = randn(2, 3, 1100, dtype=dtype, seed=17), randn(2, 3, 1100, dtype=dtype, seed=18)
    expected = silu_gate_reference(gate, up)
    assert_close(silu_gate_fused(torch.cat([gate, up], -1)), expected, dtype)
    assert (silu_gate_fused(torch.cat([gate, up], -1)).float() - gelu_tanh_gate_reference(gate, up).float()).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_writes_q_and_the_cache(dtype):
    heads, kv_heads, head_dim = 4, 1, 24
    qkv = randn(2, 5, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=20)
    positions = torch.tensor([[7, 8, 9, 10, 11], [3, 4, 5, 6, 7]], device=DEVICE)
    inv = inverse_frequencies(head_dim, 10000.0, torch.device(DEVICE))
    keys = torch.full((2, 9, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    values = torch.full_like(keys, float("nan"))
    q = qkv_rope(qkv, positions, inv, heads, kv_heads, keys[:, 4:], values[:, 4:])
    q_ref, k_ref, v_ref = qkv_rope_reference(qkv, positions, inv, heads, kv_heads)
    assert_close(q, q_ref, dtype)
    assert_close(keys[:, 4:], k_ref, dtype)
    assert torch.equal(values[:, 4:], v_ref)
    assert torch.isnan(keys[:, :4]).all() and torch.isnan(values[:, :4]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_writes_the_cache_row_given_on_the_device(dtype):
    """A decode step: one token (Llama geometry, no GQA) written at the cache row held in a device tensor,
    so a replayed CUDA graph can write a different row each step; prefill-style writes at row 0 too."""
    heads, kv_heads, head_dim = 3, 3, 32
    inv = inverse_frequencies(head_dim, 10000.0, torch.device(DEVICE))
    keys = torch.full((2, 10, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    values = torch.full_like(keys, float("nan"))
    for row, length in ((0, 4), (6, 1), (7, 2)):
        qkv = randn(2, length, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=21 + row)
        positions = (row + torch.arange(length, device=DEVICE))[None].expand(2, -1)
        write_at = torch.tensor([row], device=DEVICE)
        q = qkv_rope(qkv, positions, inv, heads, kv_heads, keys, values, write_at=write_at)
        q_ref, k_ref, v_ref = qkv_rope_reference(qkv, positions, inv, heads, kv_heads)
        assert_close(q, q_ref, dtype)
        assert_close(keys[:, row:row + length], k_ref, dtype)
        assert torch.equal(values[:, row:row + length], v_ref)
    assert torch.isnan(keys[:, 4:6]).all() and torch.isnan(values[:, 9:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", ["rstd tensor", "recomputed from the input row"])
def test_qkv_rope_applies_the_folded_norm(dtype, source):
    """With the norm weight folded into the QKV weight, each token's QKV is scaled by its rstd before RoPE:
    from a ``(B*S,)`` tensor (prefill) or recomputed from the layer input (decode step: one row; here also
    several, which the kernel allows)."""
    heads, kv_heads, head_dim, width = 2, 1, 32, 300
    b, s = (2, 3) if source == "rstd tensor" else (1, 1)
    x = randn(b, s, width, dtype=dtype, seed=40) * 4
    qkv = randn(b, s, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=41) * 20
    positions = (5 + torch.arange(s, device=DEVICE))[None].expand(b, -1).contiguous()
    inv = inverse_frequencies(head_dim, 10000.0, torch.device(DEVICE))
    keys = torch.zeros((b, 8, kv_heads, head_dim), dtype=dtype, device=DEVICE)
    values = torch.zeros_like(keys)
    rstd = rms_rstd_reference(x, 1e-5)
    kwargs = {"rstd": rstd} if source == "rstd tensor" else {"norm_input": x}
    q = qkv_rope(qkv, positions, inv, heads, kv_heads, keys, values, eps=1e-5, **kwargs)
    q_ref, k_ref, v_ref = qkv_rope_reference(qkv, positions, inv, heads, kv_heads, rstd=rstd)
    assert_close(q, q_ref, dtype)
    assert_close(keys[:, :s], k_ref, dtype)
    assert_close(values[:, :s], v_ref, dtype)
    unscaled, _, _ = qkv_rope_reference(qkv, positions, inv, heads, kv_heads)
    assert (q.float() - unscaled.float()).abs().max() > 0.1  # the scaling really happened
    with pytest.raises(ValueError, match="not both"):
        qkv_rope(qkv, positions, inv, heads, kv_heads, keys, values, rstd=rstd, norm_input=x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [True, False])
def test_gated_activation_applies_the_folded_norm(dtype, silu):
    """The gate kernel scales gate and up by the row's rstd (given, or recomputed from the input row)."""
    x = randn(3, 1, 700, dtype=dtype, seed=42) * 3
    gate, up = randn(3, 1, 1100, dtype=dtype, seed=43) * 2, randn(3, 1, 1100, dtype=dtype, seed=44) * 2
    rstd = rms_rstd_reference(x, 1e-6)
    reference = (silu_gate_reference if silu else gelu_tanh_gate_reference)(gate, up, rstd=rstd)
    fused = torch.cat([gate, up], -1)
    assert_close(gelu_tanh_gate_fused(fused, silu=silu, rstd=rstd), reference, dtype)
    assert_close(gelu_tanh_gate_fused(fused, silu=silu, norm_input=x), reference, dtype)
    assert (gelu_tanh_gate_fused(fused, silu=silu).float() - reference.float()).abs().max() > 0.1
    with pytest.raises(ValueError, match="rstd has 2 values"):
        gelu_tanh_gate_fused(fused, silu=silu, rstd=rstd[:2])


#: Options of the end-to-end variants (the rest stay at their defaults).
DECODER_VARIANTS = {
    "kernel chain": {"persistent_expert": False, "pdl": "off"},
    "persistent layer": {"expert_launch": "layer", "pdl": "off"},
    "op-by-op encoder": {"persistent_expert": False, "fused_encoder": False, "pdl": "off"},
    "pdl, kernel chain": {"persistent_expert": False, "pdl": "on"},
    "pdl, Euler launch": {"pdl": "on"},
}


@pytest.mark.parametrize("decoder_variant", ["kernel chain", *(pytest.param(variant, marks=pytest.mark.slow)
                                                              for variant in list(DECODER_VARIANTS)[1:])])
@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_backend_matches_pytorch_end_to_end(tmp_path, model_type, decoder_variant):
    """The op kernels and the fused stages compute the reference function (fp32), for each
    :class:`TritonOptions` path of the Pi0 family: each expert layer as a kernel chain (cuBLAS GEMMs with
    separate norm, QKV/RoPE, attention and GELU-gate kernels), as one persistent kernel a layer, or (the default)
    one launch a whole Euler step, here with programmatic dependent launch (Hopper GPUs only; without it the Euler
    launch is tested in test_expert_step.py); the vision tower and prefix fused or op by op."""
    import cortexflow as cf
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.kernels.pdl import pdl_supported

    options = DECODER_VARIANTS[decoder_variant]
    if options["pdl"] == "on" and not pdl_supported(torch.device(DEVICE)):
        pytest.skip("programmatic dependent launch needs a CUDA GPU of compute capability >= 9.0 (Hopper)")
    triton_backend = TritonBackend.configured(**options)
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    config = tiny_model_config(model_type, chunk_size=3, num_diffusion_steps=2, num_vision_layers=1, image_size=56)
    write_checkpoint(tmp_path, config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    noise = rng.standard_normal((3, 8)).astype(np.float32)
    state = rng.standard_normal(5) if model_type == "pi0" else None
    create = cf.create_pi0_inference if model_type == "pi0" else cf.create_pi05_inference
    outputs = {}
    for name, backend in (("pytorch", "pytorch"), ("triton", triton_backend)):
        engine = create(tmp_path, backend=backend, device=DEVICE, dtype="float32",
                        model_config=config, use_cuda_graphs=False)
        outputs[name] = engine.predict(images, prompt_tokens=[2, 7, 8, 9], state=state, noise=noise,
                                       image_masks=[True, False])
    assert engine.backend.options == TritonOptions(**options)
    rel = np.linalg.norm(outputs["triton"] - outputs["pytorch"]) / np.linalg.norm(outputs["pytorch"])
    assert rel <= 1e-5


def test_unsupported_head_dim_falls_back_with_one_warning():
    import cortexflow as cf
    from cortexflow.backends.triton_backend import TritonBackend

    backend = TritonBackend(torch.device(DEVICE), torch.float32)
    q, k, v = (randn(1, 5, 2, 512, dtype=torch.float32, seed=s) for s in (17, 18, 19))
    with pytest.warns(cf.CortexFlowWarning, match="attention falls back"):
        out = backend.attention(q, k, v, None, 0.05)
    expected = attention_reference(q, k, v, None, 0.05).reshape(1, 5, -1)
    assert_close(out, expected, torch.float32)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    import cortexflow as cf
    from cortexflow.backends.triton_backend import TritonBackend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(cf.BackendUnavailableError, match="CUDA GPU"):
        TritonBackend(torch.device("cpu"), torch.float32)

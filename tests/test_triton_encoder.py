"""The Triton backend's fused vision tower and prefix (backends/triton_encoder.py) against the model's op-by-op
stages on the PyTorch backend in fp32, on a tiny random Pi0 / Pi0.5 (CPU: Triton interpreter; GPU: real kernels).

The inputs are fresh random images, prompt tokens with padding and one masked view, so the prefix mask,
the RoPE positions after a masked view and the chain of residuals added by the next LayerNorm are exercised.
"""

import pytest
import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.backends.triton_backend import TritonBackend
from cortexflow.backends.triton_encoder import fuse_encoder_weights, prefix_layers_fused, vision_stack_fused
from cortexflow.kernels.layer_norm import layer_norm, layer_norm_reference
from cortexflow.models.pi0 import model_class
from cortexflow.random_checkpoint import random_weights, tiny_model_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: ‖Δ‖/‖ref‖ and max |Δ| / (max |ref| + 1) against the fp32 reference, per compute dtype (bf16: a 2-layer
#: tower and prefix accumulate a few bf16 roundings per layer).
BOUNDS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 4e-2)}


def _close(out, ref, dtype, what):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), what
    rel = ((out - ref).norm() / ref.norm()).item()
    worst = (out - ref).abs().max().item() / (ref.abs().max().item() + 1.0)
    rel_bound, abs_bound = BOUNDS[dtype]
    assert rel <= rel_bound, f"{what}: ‖Δ‖/‖ref‖ {rel:.3e} > {rel_bound:.1e}"
    assert worst <= abs_bound, f"{what}: max |Δ| {worst:.3e} of the scale > {abs_bound:.1e}"


def _setup(model_type, dtype, seed=0):
    config = tiny_model_config(model_type, num_vision_layers=3, num_encoder_layers=3, num_decoder_layers=3,
                               image_size=98, max_token_len=21)  # 49 patches a view, 21 tokens: no tile multiples
    model = model_class(config.model_type)(config)
    raw = {k: v.to(DEVICE) for k, v in random_weights(config, seed=seed).items()}
    weights = {k: v.to(model.weight_dtype(k, dtype)) for k, v in raw.items()}
    g = torch.Generator().manual_seed(seed + 1)
    views, tokens = 2, config.max_token_len
    size = config.image_size
    images = (torch.rand(1, views, 3, size, size, generator=g) * 2 - 1).to(DEVICE)
    token_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=g).to(DEVICE)
    token_mask = torch.zeros(1, tokens, dtype=torch.bool, device=DEVICE)
    token_mask[:, :7] = True  # a 7-token prompt, the rest padding
    image_masks = torch.tensor([[True, False]], device=DEVICE)  # the second view is missing
    return model, raw, weights, images, dict(token_ids=token_ids, token_mask=token_mask, image_masks=image_masks)


def _encoder_weights_fused(model, weights) -> bool:
    groups = model.fusable_weights()
    return vision_stack_fused(groups.vision_stacks[0], weights) and prefix_layers_fused(groups.encoder_layers, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_fused_encoder_matches_op_by_op_reference(model_type, dtype):
    model, raw, weights, images, text = _setup(model_type, dtype)
    reference = PyTorchBackend(torch.device(DEVICE), torch.float32)
    triton = TritonBackend(torch.device(DEVICE), dtype)
    assert triton.options.fused_encoder
    weights = triton.prepare_weights(model, weights)
    assert _encoder_weights_fused(model, weights)

    ref_tokens = reference.vision_encoder(model, raw, {"images": images})
    tokens = triton.vision_encoder(model, weights, {"images": images})
    assert tokens.dtype == dtype and tokens.shape == ref_tokens.shape
    _close(tokens, ref_tokens, dtype, "image tokens")

    # The prefix on the reference's image tokens, so its error is the prefix's own.
    inputs = dict(text, image_tokens=ref_tokens)
    ref_prefix = reference.transformer_encoder(model, raw, inputs)
    prefix = triton.transformer_encoder(model, weights, dict(inputs, image_tokens=ref_tokens.to(dtype)))
    assert torch.equal(prefix["prefix_mask"], ref_prefix["prefix_mask"])
    assert len(prefix["kv_cache"]) == len(ref_prefix["kv_cache"]) == model.config.num_encoder_layers
    valid = ref_prefix["prefix_mask"][0]
    for i, ((k, v), (rk, rv)) in enumerate(zip(prefix["kv_cache"], ref_prefix["kv_cache"])):
        assert k.shape == rk.shape and v.shape == rv.shape
        # Padding and masked-view rows are never attended to; compare the rows that are.
        _close(k[:, valid], rk[:, valid], dtype, f"layer {i} keys")
        _close(v[:, valid], rv[:, valid], dtype, f"layer {i} values")


@pytest.mark.parametrize("backend_name", ["pytorch", "triton"])
def test_prefix_cache_written_with_room_for_the_suffix_is_used_in_place(backend_name):
    """With the chunk of the denoising call that follows, the prefix pass writes its K/V into buffers with room for
    that call's suffix (on Triton, straight from the QKV/RoPE kernel); the K/V equal the plain pass's bit for bit,
    and ``begin_denoising`` takes the buffers as they are, where a plain list is copied."""
    from cortexflow.ops import ComputeBackend, PrefixKVCache

    model, raw, weights, images, text = _setup("pi0", torch.float32)
    backend = PyTorchBackend(torch.device(DEVICE), torch.float32) if backend_name == "pytorch" else \
        TritonBackend(torch.device(DEVICE), torch.float32)
    weights = backend.prepare_weights(model, weights)
    tokens = backend.vision_encoder(model, weights, {"images": images})
    inputs = dict(text, image_tokens=tokens)
    plain = backend.transformer_encoder(model, weights, inputs)["kv_cache"]
    chunk = 5
    cache = backend.transformer_encoder(model, weights, dict(inputs, chunk=chunk))["kv_cache"]
    p, s = plain[0][0].shape[1], model.suffix_length(chunk)
    assert isinstance(cache, PrefixKVCache) and cache.keys.shape[:3] == (model.config.num_encoder_layers, 1, p + s)
    for (k, v), (pk, pv) in zip(cache, plain):
        assert torch.equal(k, pk) and torch.equal(v, pv)
    positions = torch.arange(p, p + s, device=DEVICE)[None]
    mask = torch.ones(1, s, p + s, dtype=torch.bool, device=DEVICE)
    ctx = ComputeBackend.begin_denoising(backend, weights, model.expert(), None, cache, positions, mask, chunk, 1)
    assert ctx.keys is cache.keys and ctx.values is cache.values
    copied = ComputeBackend.begin_denoising(backend, weights, model.expert(), None, plain, positions, mask, chunk, 1)
    assert copied.keys.data_ptr() != cache.keys.data_ptr() and torch.equal(copied.keys[:, :, :p], cache.keys[:, :, :p])
    # Room for another suffix length: copied as a plain list would be.
    other = ComputeBackend.begin_denoising(backend, weights, model.expert(), None, cache, positions[:, :-1],
                                           mask[:, :-1, :-1], chunk - 1, 1)
    assert other.keys.data_ptr() != cache.keys.data_ptr() and other.keys.shape[2] == p + s - 1


def test_fused_weights_are_views_and_fusing_twice_changes_nothing():
    model, _, weights, _, _ = _setup("pi0", torch.float32)
    before = {k: v.clone() for k, v in weights.items()}
    fuse_encoder_weights(model.fusable_weights(), weights)
    fused = {k: v for k, v in weights.items()}
    fuse_encoder_weights(model.fusable_weights(), weights)
    assert all(weights[k] is fused[k] for k in fused)
    for i in range(model.config.num_vision_layers):
        p = f"vision.layers.{i}"
        for kind in ("weight", "bias"):
            joined = weights[f"{p}.qkv.{kind}"]
            assert torch.equal(joined, torch.cat([before[f"{p}.{n}.{kind}"] for n in "qkv"]))
            for n in "qkv":  # the separate weights share the fused storage: no memory added
                assert weights[f"{p}.{n}.{kind}"].untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
                assert torch.equal(weights[f"{p}.{n}.{kind}"], before[f"{p}.{n}.{kind}"])
    for i in range(model.config.num_encoder_layers):
        p = f"llm.layers.{i}"
        assert torch.equal(weights[f"{p}.gate_up"], torch.cat([before[f"{p}.gate"], before[f"{p}.up"]]))


def test_fused_encoder_can_be_switched_off():
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.errors import ConfigError

    model, _, weights, _, _ = _setup("pi0", torch.float32)
    triton = TritonBackend(torch.device(DEVICE), torch.float32, TritonOptions(fused_encoder=False))
    assert not triton.options.fused_encoder
    weights = triton.prepare_weights(model, weights)
    assert not _encoder_weights_fused(model, weights)
    with pytest.raises(ConfigError, match="TritonOptions.fused_encoder must be True or False, got 'yes'"):
        TritonOptions(fused_encoder="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_gelu_in_the_fc1_epilogue_matches_the_reference(dtype):
    from cortexflow.backends.triton_options import TritonOptions

    model, raw, weights, images, _ = _setup("pi0", dtype, seed=3)
    reference = PyTorchBackend(torch.device(DEVICE), torch.float32)
    triton = TritonBackend(torch.device(DEVICE), dtype, TritonOptions(vision_gelu="epilogue"))
    weights = triton.prepare_weights(model, weights)
    assert _encoder_weights_fused(model, weights)
    tokens = triton.vision_encoder(model, weights, {"images": images})
    _close(tokens, reference.vision_encoder(model, raw, {"images": images}), dtype, "image tokens")


def test_linear_gelu_tanh_is_the_tanh_gelu_with_or_without_the_epilogue():
    """CUDA: cuBLASLt's GELU epilogue; CPU: the kernel path, because there ``torch._addmm_activation``
    computes the erf GELU (checked here, so a change of either is seen)."""
    from cortexflow.backends.triton_encoder import linear_gelu_tanh

    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 64, generator=g, dtype=torch.float64)
    w = torch.randn(96, 64, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(96, generator=g, dtype=torch.float64)
    y = torch.nn.functional.linear(x, w, b)
    assert y.abs().max() > 3  # the range where tanh and erf GELU differ by ~1e-4
    tanh_ref = torch.nn.functional.gelu(y, approximate="tanh")
    erf_gap = (torch.nn.functional.gelu(y) - tanh_ref).abs().max().item()
    assert erf_gap > 1e-4
    if DEVICE == "cpu":
        cpu_op = torch._addmm_activation(b, x, w.t(), use_gelu=True)
        assert (cpu_op - tanh_ref).abs().max().item() > erf_gap / 2  # the erf GELU
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for epilogue in (False, True):
            out = linear_gelu_tanh(*(t.float().to(DEVICE) for t in (x, w, b)), epilogue=epilogue)
            assert out.shape == (37, 96) and out.dtype == torch.float32
            assert (out.double().cpu() - tanh_ref).abs().max().item() < erf_gap / 20, epilogue
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_vision_gelu_takes_kernel_or_epilogue():
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.errors import ConfigError

    assert TritonOptions.from_mapping({"vision_gelu": "epilogue"}).vision_gelu == "epilogue"
    with pytest.raises(ConfigError, match="TritonOptions.vision_gelu must be .*'kernel'.*'epilogue'.*got 'cublas'"):
        TritonOptions(vision_gelu="cublas")


def test_a_vision_tower_the_fused_stage_was_not_written_for_falls_back_with_one_warning():
    """SigLIP heads of 288 (> the attention kernel's 256): the tower runs op by op (its attention on the
    PyTorch op), with one warning naming the fused stage, and matches the reference."""
    import cortexflow as cf

    config = tiny_model_config("pi0", num_vision_heads=1, vision_encoder_dim=288, vision_mlp_dim=64,
                               num_vision_layers=1, image_size=42)
    model = model_class(config.model_type)(config)
    weights = {k: v.to(DEVICE) for k, v in random_weights(config, seed=3).items()}
    triton = TritonBackend(torch.device(DEVICE), torch.float32)
    prepared = triton.prepare_weights(model, dict(weights))
    images = (torch.rand(1, 1, 3, 42, 42, generator=torch.Generator().manual_seed(4)) * 2 - 1).to(DEVICE)
    with pytest.warns(cf.CortexFlowWarning, match="fused vision tower / prefix falls back.*head_dim 288 > 256"):
        tokens = triton.vision_encoder(model, prepared, {"images": images})
    reference = PyTorchBackend(torch.device(DEVICE), torch.float32).vision_encoder(model, weights, {"images": images})
    _close(tokens, reference, torch.float32, "image tokens")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_adds_the_residual_in_place(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 72, generator=g) * 2).to(dtype=dtype, device=DEVICE)
    residual = (torch.randn(37, 72, generator=g) * 0.3).to(dtype=dtype, device=DEVICE)
    w, b = (torch.randn(72, generator=g).to(DEVICE) for _ in range(2))
    expected_x = (x.float() + residual.float()).to(dtype)
    expected = layer_norm_reference(x, w, b, 1e-6, residual=residual)
    out = layer_norm(x, w, b, 1e-6, residual=residual)
    # The residual stream now holds x + residual, rounded once (the interpreter truncates fp32 -> bf16
    # casts instead of rounding them: one bf16 ulp there).
    ulp = 2.0**-7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0.0
    assert ((x.float() - expected_x.float()).abs() <= ulp * expected_x.float().abs()).all()
    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() <= bound
    with pytest.raises(ValueError, match="contiguous"):
        layer_norm(x.t(), w[:37], b[:37], 1e-6, residual=residual.t())
    with pytest.raises(ValueError, match="does not match"):
        layer_norm(x, w, b, 1e-6, residual=residual[:5])


def test_fp8_prefix_stays_within_e4m3_error_of_the_reference():
    """``TritonOptions(fp8="prefix")``: the prefix layers' projections are E4M3 GEMMs (activations quantised per
    row); the K/V caches stay within E4M3's error of the fp32 reference and are not the bf16 path's values. On
    random data a product's relative error is about the rms relative rounding error of its E4M3 operands (~3 %
    each: 3 mantissa bits), and the layers chain several products, hence the 15 % bound (bf16: 2 %)."""
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.quantization.fp8 import is_fp8

    model, raw, weights, images, text = _setup("pi0", torch.bfloat16)
    reference = PyTorchBackend(torch.device(DEVICE), torch.float32)
    ref_tokens = reference.vision_encoder(model, raw, {"images": images})
    inputs = dict(text, image_tokens=ref_tokens)
    ref_prefix = reference.transformer_encoder(model, raw, inputs)
    caches = {}
    for stages in ("off", "prefix"):
        backend = TritonBackend(torch.device(DEVICE), torch.bfloat16, TritonOptions(fp8=stages))
        prepared = backend.prepare_weights(model, dict(weights))
        layer = model.fusable_weights().encoder_layers[0]
        assert is_fp8(prepared[layer.name("gate_up")]) == (stages == "prefix")
        caches[stages] = backend.transformer_encoder(model, prepared, dict(inputs, image_tokens=ref_tokens.to(torch.bfloat16)))
    valid = ref_prefix["prefix_mask"][0]

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for i, ((k, v), (bk, bv), (rk, rv)) in enumerate(zip(caches["prefix"]["kv_cache"], caches["off"]["kv_cache"],
                                                         ref_prefix["kv_cache"])):
        for got, bf16, want, what in ((k, bk, rk, "keys"), (v, bv, rv, "values")):
            got, bf16, want = got[:, valid], bf16[:, valid], want[:, valid]
            assert torch.isfinite(got.float()).all()
            assert rel(got, want) <= 0.15, f"layer {i} {what}: {rel(got, want):.3e} from the fp32 reference"
            if i > 0:  # layer 0's K/V come from the embeddings' QKV projection alone: E4M3 must show there too
                assert rel(got, bf16) > 1e-3, f"layer {i} {what} equal the bf16 path's: the FP8 GEMMs did not run"

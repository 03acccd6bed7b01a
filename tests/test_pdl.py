"""Programmatic dependent launch (kernels/pdl.py): the decode layer's kernel chain gives bit-identical
results with and without PDL, eagerly and replayed in a CUDA graph with fresh inputs (a missing wait
would read a buffer before the kernel writing it had finished). PDL needs a Hopper-or-newer GPU, so the
chain tests run only there; the setting's refusals are tested everywhere."""

import math

import pytest
import torch

pytest.importorskip("triton")

from cortexflow.kernels.pdl import pdl_supported  # noqa: E402

CUDA = torch.device("cuda")
HOPPER = torch.cuda.is_available() and pdl_supported(CUDA)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a CUDA GPU of compute "
                                                     "capability >= 9.0 (Hopper); this machine has none")


def decode_layer_chain(x, w, cache_k, cache_v, write_at, positions, mask, inv_freq, pdl, preload=False):
    """A Llama-style one-row layer: norm + QKV GEMV, QKV/RoPE into the cache, split attention + combine,
    o GEMV + residual, norm + gate/up + SiLU GEMV, down GEMV + residual (in place). ``preload``: the attention
    reads the cache rows but ``write_at`` before its PDL wait (the test writes them, the mask and ``write_at``
    with copies before the chain, which keeps ``fresh_row``'s promise)."""
    from cortexflow.kernels.attention import attention
    from cortexflow.kernels.decode_gemv import decode_gemv
    from cortexflow.kernels.qkv_rope import qkv_rope

    heads, kv_heads, head_dim = 4, 2, 64
    qkv = decode_gemv(x, w["qkv"], norm_weight=w["attn_norm"], eps=1e-5, pdl=pdl)
    q = qkv_rope(qkv, positions, inv_freq, heads, kv_heads, cache_k, cache_v, write_at=write_at, pdl=pdl)
    attn = attention(q, cache_k, cache_v, mask, 1.0 / math.sqrt(head_dim), num_splits=4, pdl=pdl,
                     fresh_row=write_at if preload else None)
    h = decode_gemv(attn.reshape(1, 1, -1), w["o"], residual=x, pdl=pdl)
    act = decode_gemv(h, w["gate_up"], norm_weight=w["mlp_norm"], eps=1e-5, gated="silu", pdl=pdl)
    return decode_gemv(act, w["down"], residual=h, out=h.view(-1), pdl=pdl)


def expert_layer_chain(x, w, cache_k, cache_v, write_at, positions, mask, inv_freq, pdl):
    """A Pi0-expert-style layer over several rows, as the backend's kernel chain runs it: RMSNorm, cuBLAS QKV
    GEMM, QKV/RoPE into the cache, split attention + combine, cuBLAS o GEMM + residual, RMSNorm, cuBLAS gate/up
    + GELU gate kernel, cuBLAS down GEMM + residual, then an Euler update of an fp32 state (``w["state"]``);
    the Triton kernels with PDL."""
    import torch.nn.functional as F

    from cortexflow.kernels.attention import attention
    from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused
    from cortexflow.kernels.qkv_rope import qkv_rope
    from cortexflow.kernels.rms_norm import rms_norm

    rows = x.shape[1]
    h = rms_norm(x, w["attn_norm"], 1e-6, pdl=pdl)
    qkv = F.linear(h, w["qkv"])
    token_positions = positions + torch.arange(rows, device=positions.device)[None]  # (1, rows)
    q = qkv_rope(qkv, token_positions, inv_freq, 4, 2, cache_k, cache_v, write_at=write_at, pdl=pdl)
    attn = attention(q, cache_k, cache_v, mask.expand(1, rows, -1), 0.125, num_splits=4, pdl=pdl)
    h2 = torch.addmm(x.view(rows, -1), attn.reshape(rows, -1), w["o"].T)
    act = gelu_tanh_gate_fused(F.linear(rms_norm(h2.view(1, rows, -1), w["mlp_norm"], 1e-6, pdl=pdl), w["gate_up"]))
    out = h2.addmm_(act.view(rows, -1), w["down"].T).view(1, rows, -1)
    w["state"].add_(F.linear(out, w["head"]), alpha=-0.1)
    return out


def make_inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    width, ffn, max_len = 256, 704, 96
    w = {"qkv": rand(8 * 64, width, scale=width**-0.5), "o": rand(width, 4 * 64, scale=0.05),
         "gate_up": rand(2 * ffn, width, scale=width**-0.5), "down": rand(width, ffn, scale=ffn**-0.5),
         "attn_norm": rand(width, scale=0.1).float(), "mlp_norm": rand(width, scale=0.1).float()}
    w["head"] = rand(16, width, scale=width**-0.5)
    w["state"] = torch.randn(1, 7, 16, device="cuda", generator=g)
    cache_k, cache_v = rand(1, max_len, 2, 64), rand(1, max_len, 2, 64)
    return w, cache_k, cache_v


def preloading_decode_layer_chain(*args):
    return decode_layer_chain(*args, preload=True)


@needs_hopper
@pytest.mark.parametrize("chain, rows", [(decode_layer_chain, 1), (preloading_decode_layer_chain, 1),
                                         (expert_layer_chain, 7)])
def test_layer_chain_is_identical_with_pdl_eager_and_in_a_graph(chain, rows):
    """Token-VLA decode layer (one row; its attention's cache rows loaded after or before the PDL wait) and
    Pi0-expert kernel chain (7 rows, fp32 state update). With the preload, a fresh row read before the QKV/RoPE
    kernel wrote it would change the outputs of the steps after the first."""
    from cortexflow.kernels.rope import inverse_frequencies

    w, cache_k, cache_v = make_inputs(0)
    inv_freq = inverse_frequencies(64, 10000.0, CUDA)
    max_len = cache_k.shape[1]
    results = {}
    state = w.pop("state")
    for pdl in (False, True):
        ck, cv = cache_k.clone(), cache_v.clone()
        w["state"] = state.clone()
        x = torch.empty(1, rows, 256, device="cuda", dtype=torch.bfloat16)
        write_at = torch.zeros(1, dtype=torch.long, device="cuda")
        positions = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        mask = torch.zeros(1, 1, max_len, dtype=torch.bool, device="cuda")

        def set_step(step):
            g = torch.Generator(device="cuda").manual_seed(100 + step)
            x.copy_(torch.randn(1, rows, 256, device="cuda", generator=g).bfloat16())
            write_at.fill_(40 + step)
            positions.fill_(40 + step)
            mask.copy_((torch.arange(max_len, device="cuda") <= 40 + step)[None, None])

        outs = []
        set_step(0)
        outs.append(chain(x, w, ck, cv, write_at, positions, mask, inv_freq, pdl).clone())  # eager
        graph = torch.cuda.CUDAGraph()
        set_step(1)
        chain(x, w, ck, cv, write_at, positions, mask, inv_freq, pdl)  # warm-up (compiles)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = chain(x, w, ck, cv, write_at, positions, mask, inv_freq, pdl)
        for step in range(2, 12):
            set_step(step)
            graph.replay()
            outs.append(out.clone())
        torch.cuda.synchronize()
        results[pdl] = (torch.stack(outs), ck.clone(), cv.clone(), w["state"].clone())
    plain, with_pdl = results[False], results[True]
    assert plain[0].float().norm() > 0
    for a, b in zip(plain, with_pdl):
        assert torch.equal(a, b), f"PDL changed the result: max |Δ| {(a.float() - b.float()).abs().max():.3e}"


def test_pdl_option_is_checked(monkeypatch):
    """A typo is refused naming the values; PDL forced on where it cannot run is refused at creation."""
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.errors import BackendUnavailableError, ConfigError

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="TritonOptions.pdl must be 'auto', 'on' or 'off', got 'yes'"):
        TritonBackend.configured(pdl="yes")
    forced_on = TritonBackend.configured(pdl="on")
    if HOPPER:
        assert forced_on(torch.device(device), torch.float32).pdl
    else:
        with pytest.raises(BackendUnavailableError, match="compute capability 9.0"):
            forced_on(torch.device(device), torch.float32)
    assert not TritonBackend.configured(pdl="off")(torch.device(device), torch.float32).pdl

"""Fused softmax attention (flash-attention style, forward only) in Triton, with grouped / multi-query
KV heads and an optional boolean mask.

Layouts: ``q (B, Lq, Hq, D)``, ``k, v (B, Lk, Hkv, D)`` (any strides with a contiguous last dim; ``Hq``
a multiple of ``Hkv``), ``mask (B, Lq, Lk)`` bool (True = may attend) or None; output ``(B, Lq, Hq, D)``.
Logits are fp32 (``q·k * scale``); masked logits get openpi's finite -2.3819763e38 (so a query with no
visible key averages all keys, exactly like the reference); softmax is online in fp32; ``p`` is cast to
``v``'s dtype for the second product. One program handles ``BLOCK_M`` queries of one head and loops over
the keys; ``D`` need not be a power of two (SigLIP's 72 is padded to 128 in registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import next_power_of_two, upcast_dots

MASKED_LOGIT = -2.3819763e38
_MASKED_LOGIT = tl.constexpr(MASKED_LOGIT)
LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    scale_log2, q_len, k_len, head_dim, n_q_heads, group,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, smb, smq, smk, sob, sol, soh,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    kv_h = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_valid = offs_d < head_dim
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
        mask=(offs_m[:, None] < q_len) & d_valid[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * skb + kv_h * skh
    v_base = v_ptr + b * svb + kv_h * svh
    for start in range(0, k_len, BLOCK_N):
        keys = start + offs_n
        k_valid = keys < k_len
        kt = tl.load(k_base + keys[None, :] * skl + offs_d[:, None], mask=k_valid[None, :] & d_valid[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        if HAS_MASK:
            allowed = tl.load(
                mask_ptr + b * smb + offs_m[:, None] * smq + keys[None, :] * smk,
                mask=(offs_m[:, None] < q_len) & k_valid[None, :], other=0,
            )
            s = tl.where(allowed != 0, s, _MASKED_LOGIT)
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * svl + offs_d[None, :], mask=k_valid[:, None] & d_valid[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            p_cast = p
        else:
            p_cast = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p_cast, v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < q_len) & d_valid[None, :],
    )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Masked multi-/grouped-query attention; returns ``(B, Lq, Hq, D)`` in ``q``'s dtype."""
    b, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    block_d = max(16, next_power_of_two(head_dim))  # tl.dot needs K >= 16 on the GPU
    block_m = 64
    block_n = 64 if block_d <= 128 else 32
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = mask.stride()
    else:
        mask, mask_strides = q, (0, 0, 0)
    grid = (triton.cdiv(q_len, block_m), b * q_heads)
    _attention_kernel[grid](
        q, k, v, mask, out,
        scale * LOG2E, q_len, k_len, head_dim, q_heads, q_heads // kv_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mask_strides, out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=mask is not q, UPCAST=upcast_dots(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=8 if block_d >= 256 else 4, num_stages=2,
    )
    return out


def attention_reference(q, k, v, mask, scale):
    """The same computation in PyTorch (fp32 logits and softmax), output ``(B, Lq, Hq, D)``."""
    group = q.shape[2] // k.shape[2]
    kr = k.float().repeat_interleave(group, dim=2)
    vr = v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), kr) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], MASKED_LOGIT)
    probs = torch.softmax(logits, -1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vr)

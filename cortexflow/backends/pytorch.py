"""The reference backend: every op in plain PyTorch, on CPU or GPU, in any dtype.

Numerics follow the openpi JAX reference: norms and RoPE in fp32, attention logits and softmax in
fp32, linears computed in the dtype of their input (a bf16 weight meeting an fp32 input is promoted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cortexflow.ops import ComputeBackend

# The value openpi adds to masked attention logits (big_vision's large negative).
MASKED_LOGIT = -2.3819763e38

#: Byte alignment of the CPU weights the BLAS reads (that of torch's CPU allocator).
CPU_WEIGHT_ALIGNMENT = 64


class PyTorchBackend(ComputeBackend):
    """Plain PyTorch ops; the ground truth the fast backends are compared with."""

    name = "pytorch"

    def fuse_weights(self, weights, groups):
        """On the CPU, copy every weight whose data does not start on a :data:`CPU_WEIGHT_ALIGNMENT`-byte boundary
        (tensors read from a safetensors file start at the file's 8-byte offsets; torch allocates at 64). The CPU
        BLAS's sums depend on its operands' alignment: on an AVX2 machine the same weights read from a file and built
        in memory gave actions 1-2 ulp apart. With the copies every load path computes the same bits."""
        if self.device.type == "cpu":
            for name, tensor in weights.items():
                if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_WEIGHT_ALIGNMENT:
                    weights[name] = tensor.clone()
        return weights

    def linear(self, x, weight, bias=None):
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def layer_norm(self, x, weight, bias, eps):
        y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
        return y.to(x.dtype)

    def rms_norm(self, x, weight, eps):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        if weight is not None:
            y = y * (1.0 + weight.float())
        return y.to(x.dtype)

    def ada_rms_norm(self, x, scale, shift, eps):
        y = self.rms_norm(x.float(), None, eps)
        y = y * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
        return y.to(x.dtype)

    def rope(self, x, positions, base):
        head_dim = x.shape[-1]
        half = head_dim // 2
        exponents = torch.arange(half, device=x.device, dtype=torch.float32) * (2.0 / head_dim)
        inv_timescale = base ** (-exponents)
        radians = positions.to(torch.float32)[..., None] * inv_timescale  # (B, L, half)
        sin = torch.sin(radians)[:, :, None, :]
        cos = torch.cos(radians)[:, :, None, :]
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def attention(self, q, k, v, mask, scale):
        batch, q_len, q_heads, head_dim = q.shape
        kv_heads = k.shape[2]
        group = q_heads // kv_heads
        # (B, Hkv, group*Lq, Dh): the query heads sharing one KV head are stacked along the rows.
        qg = q.reshape(batch, q_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(batch, kv_heads, group * q_len, head_dim)
        kt = k.permute(0, 2, 3, 1)  # (B, Hkv, Dh, Lk)
        logits = torch.matmul(qg.float(), kt.float()) * scale  # fp32 logits
        logits = logits.view(batch, kv_heads, group, q_len, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :, :], MASKED_LOGIT)
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        probs = probs.view(batch, kv_heads, group * q_len, -1)
        out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # (B, Hkv, group*Lq, Dh)
        out = out.view(batch, kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(batch, q_len, q_heads * head_dim)

    def gelu_tanh(self, x):
        return F.gelu(x, approximate="tanh")

    def gelu_tanh_gate(self, gate, up):
        return F.gelu(gate, approximate="tanh") * up

    def silu(self, x):
        return F.silu(x)

    def patch_embed(self, images, weight, bias):
        patch = weight.shape[-1]
        out = F.conv2d(images, weight.to(images.dtype), bias.to(images.dtype), stride=patch)
        return out.flatten(2).transpose(1, 2)

    def embedding(self, ids, table):
        return F.embedding(ids, table)


    def conv2d(self, x, weight, bias, stride, padding, groups=1):
        top, bottom, left, right = padding
        if any(padding):
            x = F.pad(x, (left, right, top, bottom))
        bias = None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, weight.to(x.dtype), bias, stride=stride, groups=groups)

    def batch_norm(self, x, mean, var, gamma, beta, eps):
        scale = gamma.float() * torch.rsqrt(var.float() + eps)
        shift = beta.float() - mean.float() * scale
        y = x.float() * scale[None, :, None, None] + shift[None, :, None, None]
        return y.to(x.dtype)

    def sigmoid(self, x):
        return torch.sigmoid(x)

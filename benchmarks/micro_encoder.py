"""Micro-benchmark of the Pi0 vision tower and prefix at real size (bf16, one GPU): the model's op-by-op stages
on the Triton backend's ops vs the fused stages (``cortexflow/backends/triton_encoder.py``), the SigLIP
attention as the Triton kernel vs torch's SDPA, and a tiling sweep of the prefix attention (Triton kernel at
several row tiles / warps / key splits, and torch's SDPA with the boolean mask).

Stages are captured ``--calls`` times in one CUDA graph and replayed (``micro_decoder_kernels.graph_time_us``);
single attention calls 50 times. Every fused variant is checked against the op-by-op stage on the same
weights and inputs (‖Δ‖/‖ref‖). Writes ``$OUT/micro_encoder.json`` and prints a table last.

    python benchmarks/micro_encoder.py [--views 2] [--prompt-len 20] [--calls 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from micro_decoder_kernels import graph_time_us, rel  # noqa: E402

from cortexflow.backends import triton_encoder as te  # noqa: E402
from cortexflow.backends.triton_backend import TritonBackend  # noqa: E402
from cortexflow.config import ModelConfig  # noqa: E402
from cortexflow.kernels.attention import attention  # noqa: E402
from cortexflow.models.pi0 import model_class  # noqa: E402
from cortexflow.models.siglip import siglip_embed, siglip_stack  # noqa: E402
from cortexflow.ops import FusableWeights  # noqa: E402
from cortexflow.random_checkpoint import random_weights  # noqa: E402
from cortexflow.tools import environment_info  # noqa: E402

#: Prefix attention tilings tried (``kernels.attention.attention`` keywords); {} is the kernel's default.
PREFIX_TILINGS = {
    "default": {},
    "block_m 32": {"block_m": 32},
    "block_m 32, 4 warps": {"block_m": 32, "num_warps": 4},
    "block_m 16": {"block_m": 16},
    "block_m 64, 4 warps": {"block_m": 64, "num_warps": 4},
    "block_m 64, 2 key splits": {"block_m": 64, "num_splits": 2},
    "block_m 128": {"block_m": 128},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10, help="stage calls per CUDA graph")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    config = ModelConfig.for_model("pi0")
    model = model_class(config.model_type)(config)
    started = time.time()
    raw = random_weights(config, seed=0, device=device)
    weights = {k: v.to(model.weight_dtype(k, dtype)) for k, v in raw.items()
               if k.startswith(("vision.", "llm.", "projector."))}
    del raw
    backend = TritonBackend(device, dtype)
    weights = te.fuse_encoder_weights(FusableWeights((siglip_stack(config),), model.prefix_layers()), weights)
    print(f"weights ready in {time.time() - started:.1f} s", flush=True)

    g = torch.Generator(device=device).manual_seed(1)
    views, tokens = args.views, config.max_token_len
    size = config.image_size
    images = torch.rand(1, views, 3, size, size, generator=g, device=device) * 2 - 1
    token_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=g, device=device)
    token_mask = torch.zeros(1, tokens, dtype=torch.bool, device=device)
    token_mask[:, :args.prompt_len] = True
    text = dict(token_ids=token_ids, token_mask=token_mask,
                image_masks=torch.ones(1, views, dtype=torch.bool, device=device))
    rows, results = [], {"environment": environment_info(device), "views": views, "prompt_len": args.prompt_len,
                         "stage_calls_per_graph": args.calls}

    def time_stage(name, fn, reference=None, flatten=None):
        try:
            out = fn()
            error = None if reference is None else rel(flatten(out), flatten(reference))
            us = graph_time_us(fn, calls=args.calls)
        except Exception as err:  # a tiling that does not compile (registers, shared memory): record it, go on
            print(f"{name}: failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
            rows.append((name, float("nan"), None))
            return None
        rows.append((name, us, error))
        print(f"{name:58s} {us:9.1f} us  rel {error if error is not None else float('nan'):.2e}", flush=True)
        return out

    # ---- vision stage ----
    vision_in = {"images": images}
    ref_tokens = time_stage("vision: op by op (model code, Triton ops)",
                            lambda: model.vision_encoder(backend, weights, vision_in))
    same = lambda t: t  # noqa: E731
    for mode in ("triton", "sdpa"):
        time_stage(f"vision: fused, {mode} attention", lambda m=mode: _fused_vision(backend, model, weights, images, m),
                   ref_tokens, same)

    # ---- prefix stage ----
    prefix_in = dict(text, image_tokens=ref_tokens)
    kv = lambda out: torch.cat([t.flatten() for pair in out for t in pair])  # noqa: E731
    ref_prefix = time_stage("prefix: op by op (model code, Triton ops)",
                            lambda: model.transformer_encoder(backend, weights, prefix_in)["kv_cache"])
    embedded, valid = model.embed_prefix(backend, weights, prefix_in)
    positions, prefix_mask = model.prefix_positions_and_mask(valid)
    for name, tiling in PREFIX_TILINGS.items():
        time_stage(f"prefix: fused, attention {name}",
                   lambda t=tiling: te.fused_prefix(backend, weights, model.prefix_layers(), embedded.clone(), positions,
                                                    prefix_mask, attention_tiling=t),
                   ref_prefix, kv)

    # ---- attention alone ----
    x, valid = model.embed_prefix(backend, weights, prefix_in)
    p = x.shape[1]
    mask = (valid[:, None, :] & valid[:, :, None]).contiguous()
    q = torch.randn(1, p, config.num_heads, config.head_dim, generator=g, device=device).to(dtype)
    k, v = (torch.randn(1, p, config.num_kv_heads, config.head_dim, generator=g, device=device).to(dtype) for _ in "kv")
    scale = model.prefix_layers()[0].dims.attention_scale
    ref = attention(q, k, v, mask, scale)
    for name, tiling in PREFIX_TILINGS.items():
        time_stage(f"prefix attention ({p} tokens): triton {name}", lambda t=tiling: attention(q, k, v, mask, scale, **t),
                   ref, same)
    sdpa_mask = mask[:, None]
    time_stage(f"prefix attention ({p} tokens): torch SDPA, bool mask",
               lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=sdpa_mask, scale=scale, enable_gqa=True).transpose(1, 2),
               ref, lambda t: t[:, valid[0]])
    n, t, d, heads = views, config.num_patches, config.vision_encoder_dim, config.num_vision_heads
    qkv = torch.randn(n, t, 3, heads, d // heads, generator=g, device=device).to(dtype)
    vscale = (d // heads) ** -0.5
    vref = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, vscale)
    time_stage(f"vision attention ({n}x{t} tokens): triton", lambda: attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                                                                 None, vscale), vref, same)
    time_stage(f"vision attention ({n}x{t} tokens): torch SDPA",
               lambda: F.scaled_dot_product_attention(*(qkv[:, :, j].transpose(1, 2) for j in range(3)),
                                                      scale=vscale).transpose(1, 2).contiguous(), vref, same)

    results["rows"] = [{"case": name, "us": us, "rel_vs_reference": error} for name, us, error in rows]
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "micro_encoder.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'case':70s} {'us':>9s} {'rel':>9s}")
    for name, us, error in rows:
        print(f"{name:70s} {us:9.1f} {error if error is not None else float('nan'):9.2e}")


def _fused_vision(backend, model, weights, images, mode):
    x = siglip_embed(backend, weights, images.flatten(0, 1)).to(backend.dtype)
    tokens = te.fused_vision_tower(weights, siglip_stack(model.config), x, vision_attention=mode,
                                   gelu_epilogue=backend.options.vision_gelu == "epilogue")
    tokens = F.linear(tokens, weights["projector.weight"], weights["projector.bias"])
    return tokens.reshape(images.shape[0], -1, tokens.shape[-1])


if __name__ == "__main__":
    main()

"""Micro-benchmark of the Pi0 expert's layers at real size (bf16, one GPU): one denoising step's 18 layers
as the default kernel chain (RMSNorm kernels + cuBLAS GEMMs + QKV/RoPE + split attention, with PDL where
supported) vs the persistent one-kernel-per-layer path (:mod:`cortexflow.kernels.expert_layer`) at several
tilings, and the persistent kernel's phases timed alone (the others masked off; barriers always run).

Each variant's step is captured 50 times in one CUDA graph and replayed (``micro_decoder_kernels.graph_time_us``);
µs per layer = step time / 18. The weight floor of a layer is its 34.6 MB of bf16 weights at the measured copy
bandwidth. Writes ``$OUT/micro_expert_layer.json`` and prints a table last.

    python benchmarks/micro_expert_layer.py [--prefix 532] [--quick] [--only TEXT ...] [--fp8] [--step]
    ncu --profile-from-start off --launch-skip 1 --launch-count 1 --set full -o expert \
        python benchmarks/micro_expert_layer.py --ncu

With ``--ncu`` nothing is timed: after a warm-up, one step of the default persistent path runs eagerly between
``cudaProfilerStart`` and ``cudaProfilerStop`` (18 launches: layer 0, 16 middle layers, the last), for Nsight
Compute to profile; with ``--fp8`` too, with E4M3 weights at the backend's FP8 tiling (``default_tiling(fp8=True)``);
with ``--step`` the step runs as one launch of the step kernel (all 18 layers, as the backend runs them: profile it
with ``--cache-control none``, so that what the instruction cache holds carries over from layer to layer), with
``--euler`` too as the whole Euler step the backend launches (action path, final norm, action head).

``--step --euler`` times the Euler step kernel, the launch the backend runs by default: a change measured on the
layers-only step kernel need not carry over (session 33: a tiling 2 µs a layer faster there ran the whole predict
0.8-6 % slower, benchmarks/NOTES.md). It times the layers-only step kernel beside it, and restores the noisy
actions ``x_t`` before each Euler step, so every replay runs the same step.

With ``--fp8`` each tiling is also timed with E4M3 weights (weight-only, per-output-channel scales; the floor of
such a layer is half the bf16 one), as the one-layer kernel and, with ``--step``, as the step kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from micro_decoder_kernels import graph_time_us, rel  # noqa: E402

from cortexflow.backends.triton_decoder import _expert_layer  # noqa: E402
from cortexflow.kernels import expert_layer as el  # noqa: E402
from cortexflow.kernels import expert_step as es  # noqa: E402
from cortexflow.kernels.pdl import pdl_supported  # noqa: E402
from cortexflow.kernels.rope import inverse_frequencies  # noqa: E402
from cortexflow.models.gemma import gemma_layers  # noqa: E402
from cortexflow.ops import DecoderDims  # noqa: E402

D, F, HEADS, KV_HEADS, HEAD_DIM, LAYERS, EPS = 1024, 4096, 8, 1, 256, 18, 1e-6
ACTION_DIM = 32
PHASES = {"barriers only": 0, "0 residual + attention norm": 1, "1 QKV + RoPE": 2, "2 attention": 4,
          "3 o partials": 8, "4 residual + MLP norm": 16, "5 gate/up + GELU": 32, "6 down partials": 64,
          "all": el.ALL_PHASES}


def tilings(quick: bool, only: list[str] | None = None) -> dict[str, el.ExpertTiling]:
    base = el.ExpertTiling()
    variants = {
        "default": base,
        "8 warps": replace(base, num_warps=8),
        "block_k 64": replace(base, block_k=64),
        "block_k 64, 5 stages": replace(base, block_k=64, num_stages=5),
        # With E4M3 weights the Euler step kernel compiled for sm_90 spills 216 B (172 local-memory instructions) at
        # the default tiling, 40 B (43) with these two (NOTES, session 30).
        "block_k 64, 2 stages": replace(base, block_k=64, num_stages=2),
        "QKV pair 8, block_k 64, 2 stages": replace(base, pair=8, block_k=64, num_stages=2),
        "block_k 256, 2 stages": replace(base, block_k=256, num_stages=2),
        "4 stages": replace(base, num_stages=4),
        "o/down 32-col tiles x 4 splits": replace(base, out_cols=16, o_splits=4, down_splits=4),
        # Without split-K (or nearly) each tile's program owns whole output columns: the premise of a layer
        # whose o / down epilogue adds the residual itself, without the row phase after it (NOTES, session 29).
        "o/down 32-col tiles x 2 splits": replace(base, out_cols=16, o_splits=2, down_splits=2),
        "o/down 32-col tiles x 1 split": replace(base, out_cols=16, o_splits=1, down_splits=1),
        "o 4 splits, down 16 splits": replace(base, o_splits=4, down_splits=16),
        "o/down 16 splits": replace(base, o_splits=16, down_splits=16),
        "attention 64-key steps": replace(base, attn_keys=64),
        "gate/up 64 cols": replace(base, gate_up_cols=64),
        "QKV pair 8 (160 tiles)": replace(base, pair=8),
        "attention logits in 1 part": replace(base, attn_d_parts=1),
        "attention logits in 4 parts": replace(base, attn_d_parts=4),
        # Session 30's sweep of the attention work split (NOTES): the default is 64-row tiles in 4 value parts with
        # the logits in 2 parts and the key ranges merged in a phase of their own.
        "attention 16 rows, last-arriver merge": replace(base, attn_rows=16, attn_merge="last", attn_v_parts=1,
                                                         attn_d_parts=4),
        "attention 16 rows, merge phase": replace(base, attn_rows=16, attn_v_parts=1, attn_d_parts=4),
        "attention 32 rows, 2 value parts": replace(base, attn_rows=32, attn_v_parts=2),
        "attention 64 rows, 2 value parts, logits in 1 part": replace(base, attn_v_parts=2, attn_d_parts=1),
        "attention 64 rows, 2 value parts, logits in 1 part, 16-key steps": replace(base, attn_v_parts=2, attn_d_parts=1,
                                                                                    attn_keys=16),
        "attention 64 rows, 4 value parts, logits in 1 part, 64-key steps": replace(base, attn_d_parts=1, attn_keys=64),
        # E4M3 weights converted to float16 in one step, times float16 norm and attention rows (timed with --fp8
        # only; session 31).
        "fp8 f16 operands": replace(base, fp8_operands="f16"),
        # The E4M3 tiles that meet bf16 rows (down; every tile with bf16 operands) converted by bits
        # (kernels/e4m3.py; session 32).
        "fp8 f16 operands, bits": replace(base, fp8_operands="f16", fp8_convert="bits"),
        "fp8 bits": replace(base, fp8_convert="bits"),
        # E4M3 weights as the MMA's first operand, which the tensor cores take from registers (session 32). The last
        # is the FP8 default since then (``default_tiling(fp8=True)``).
        "fp8 f16 operands, weights first": replace(base, fp8_operands="f16", fp8_weights_first=True),
        "fp8 f16 operands, bits, weights first": replace(base, fp8_operands="f16", fp8_convert="bits",
                                                        fp8_weights_first=True),
    }
    if only:
        return {name: t for name, t in variants.items() if name == "default" or any(o in name for o in only)}
    return {"default": base} if quick else variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=int, default=532, help="prefix tokens in the KV cache (532: 2 views, prompt 20)")
    parser.add_argument("--quick", action="store_true", help="default tiling only")
    parser.add_argument("--only", metavar="TEXT", action="append",
                        help="only the tilings whose name contains TEXT (and the default); repeatable")
    parser.add_argument("--no-phases", action="store_true", help="skip timing the phases alone")
    parser.add_argument("--phases-of", metavar="NAME", action="append", default=[],
                        help="also time the phases alone at this tiling (a variant's name; repeatable)")
    parser.add_argument("--phase", metavar="TEXT", action="append",
                        help="time only the phases whose name contains TEXT (each phase mask compiles its own kernel); "
                             "repeatable")
    parser.add_argument("--step", action="store_true",
                        help="also time each tiling as the step kernel (kernels/expert_step.py: the 18 layers in one "
                             "launch, as the backend runs them), µs per layer")
    parser.add_argument("--euler", action="store_true",
                        help="with --step: the step kernel as a whole Euler step (Pi0's action path, final norm and "
                             "action head in the launch), as the backend runs it (TritonOptions.expert_launch='euler'); "
                             "its rows have no rel vs chain (layer 0 reads the action tokens); with --ncu: profile it")
    parser.add_argument("--fp8", action="store_true",
                        help="also time each tiling with E4M3 weights (per-channel scales, weight-only)")
    parser.add_argument("--ncu", action="store_true",
                        help="time nothing: run one step of the default persistent path between cudaProfilerStart "
                             "and cudaProfilerStop, for ncu --profile-from-start off (with --step: as one launch "
                             "of the step kernel)")
    args = parser.parse_args()
    unknown = [name for name in args.phases_of if name not in tilings(False)]
    if unknown:
        parser.error(f"--phases-of {unknown[0]!r}: not a variant; the variants are {', '.join(tilings(False))}")
    device = torch.device("cuda")
    dtype = torch.bfloat16
    s, p = 51, args.prefix
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    weights = {}
    for i in range(LAYERS):
        pre = f"expert.layers.{i}"
        weights[f"{pre}.qkv"] = rnd((HEADS + 2 * KV_HEADS) * HEAD_DIM, D, scale=D**-0.5)
        weights[f"{pre}.o"] = rnd(D, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5)
        weights[f"{pre}.gate_up"] = rnd(2 * F, D, scale=D**-0.5)
        weights[f"{pre}.down"] = rnd(D, F, scale=F**-0.5)
        weights[f"{pre}.attn_norm"] = rnd(D, scale=0.1)
        weights[f"{pre}.mlp_norm"] = rnd(D, scale=0.1)
    scales = [(1.0 + weights[f"expert.layers.{i}.attn_norm"].float(), 1.0 + weights[f"expert.layers.{i}.mlp_norm"].float())
              for i in range(LAYERS)]
    hidden = rnd(1, s, D)
    keys = rnd(LAYERS, 1, p + s, KV_HEADS, HEAD_DIM)
    values = rnd(LAYERS, 1, p + s, KV_HEADS, HEAD_DIM)
    positions = (p + torch.arange(s, device=device))[None]
    suffix = torch.ones(s, s, dtype=torch.bool, device=device)
    suffix[0, 1:] = False
    mask = torch.cat([torch.ones(1, s, p, dtype=torch.bool, device=device), suffix[None]], 2).contiguous()
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, device)
    scale = HEAD_DIM**-0.5
    layers = gemma_layers("expert.layers", DecoderDims(LAYERS, HEADS, KV_HEADS, HEAD_DIM, 10000.0, EPS))
    pdl = pdl_supported(device)

    def chain():
        x = hidden
        for i in range(LAYERS):
            x = _expert_layer(weights, layers[i], x, positions, mask, keys[i], values[i], p, inv_freq, scale, EPS, None,
                              pdl=pdl)
        return x

    fp8_weights = {}
    if args.fp8:
        from cortexflow.quantization.fp8 import quantize_weight

        for name, w in weights.items():
            if w.dim() == 2:
                q = quantize_weight(w, name)
                fp8_weights[name] = q.data
                fp8_weights[f"{name}.scale"] = q.scale

    def persistent(work, phases=el.ALL_PHASES, fp8=False):
        work.reset()
        out = work.residual
        x = hidden.view(s, D)
        source = fp8_weights if fp8 else weights
        for i in range(LAYERS):
            pre = f"expert.layers.{i}"
            names = [f"{pre}.{n}" for n in ("qkv", "o", "gate_up", "down")]
            extra = {"weight_scales": tuple(fp8_weights[f"{n}.scale"] for n in names)} if fp8 else {}
            el.expert_layer(x, out, *(source[n] for n in names), scales[i][0], scales[i][1], positions, inv_freq,
                            keys[i], values[i], mask, EPS, scale, work, HEADS, launch=i, pending=i > 0,
                            finish=i == LAYERS - 1, phases=phases, **extra)
            x = out
        return out

    projections = ("qkv", "o", "gate_up", "down")
    layer_names = [[f"expert.layers.{i}.{n}" for n in projections] for i in range(LAYERS)]
    step_tables = {False: es.expert_weight_tables([tuple(weights[n] for n in names) for names in layer_names])}
    if args.fp8:
        step_tables[True] = es.expert_weight_tables([tuple(fp8_weights[n] for n in names) for names in layer_names],
                                                    [tuple(fp8_weights[f"{n}.scale"] for n in names)
                                                     for names in layer_names])
    norm_scales = torch.stack([torch.stack(pair) for pair in scales]).contiguous()

    # Pi0's action path for --euler: 32 action dimensions, the 50 action rows after the state row, fp32 weights.
    def rnd32(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    euler = None
    if args.euler:
        euler = es.EulerUpdate(x_t=rnd32(s - 1, ACTION_DIM), in_weight=rnd32(D, ACTION_DIM, scale=ACTION_DIM**-0.5),
                               in_bias=rnd32(D, scale=0.1), head_weight=rnd32(ACTION_DIM, D, scale=D**-0.5),
                               head_bias=rnd32(ACTION_DIM, scale=0.1), final_scale=1.0 + rnd32(D, scale=0.1),
                               chunk=s - 1, dt=-0.1, mid_weight=rnd32(D, D, scale=D**-0.5), mid_bias=rnd32(D, scale=0.1))

    x_t_start = None if euler is None else euler.x_t.clone()

    def step_kernel(work, fp8=False, action_path=True):
        work.reset()
        if euler is not None and action_path:
            euler.x_t.copy_(x_t_start)  # every replay the same Euler step, as every predict starts from its noise
        return es.expert_step(hidden.view(s, D), work.residual, step_tables[fp8], norm_scales, positions, inv_freq,
                              keys, values, mask, EPS, scale, work, HEADS, euler=euler if action_path else None)

    if args.ncu:
        tiling = el.default_tiling(fp8=args.fp8)  # with --fp8: E4M3 weights at the backend's FP8 tiling
        work = el.ExpertWorkspace(s, s, D, F, HEADS, KV_HEADS, HEAD_DIM, p + s, dtype, device, tiling, LAYERS)
        run = step_kernel if args.step else persistent
        for _ in range(3):
            run(work, fp8=args.fp8)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        run(work, fp8=args.fp8)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        launches = f"one launch of the {'Euler ' if args.euler else ''}step kernel ({LAYERS} layers)" if args.step \
            else f"{LAYERS} launches of the persistent layer"
        print(f"profiled one step: {launches} ({work.programs} programs, {work.n_splits} attention key ranges, "
              f"{'E4M3' if args.fp8 else 'bf16'} weights)")
        return

    # Bandwidth the floor divides by: a 1 GiB device copy.
    big = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(big)
    dst.copy_(big)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(big)
    end.record()
    torch.cuda.synchronize()
    bandwidth = 2 * big.numel() * 2 * 5 / (start.elapsed_time(end) * 1e-3)
    del big, dst
    layer_bytes = sum(weights[f"expert.layers.0.{n}"].numel() for n in ("qkv", "o", "gate_up", "down")) * 2
    floor_us = layer_bytes / bandwidth * 1e6

    rows = []
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Write the JSON with the rows so far (after every row: a run cut off by its time limit keeps them)."""
        result = dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
            triton=__import__("triton").__version__, prefix=p, suffix=s, pdl=pdl, copy_bandwidth_GBps=bandwidth / 1e9,
            layer_weight_MB=layer_bytes / 1e6, floor_us_per_layer=floor_us, rows=rows,
        )
        (out_dir / "micro_expert_layer.json").write_text(json.dumps(result, indent=1))

    reference = chain().float()
    chain_us = graph_time_us(chain) / LAYERS
    rows.append(dict(variant="kernel chain (default path)", us_per_layer=chain_us, rel_vs_chain=0.0))
    print(f"kernel chain: {chain_us:.2f} us/layer (floor {floor_us:.2f})", flush=True)
    save()

    def time_variant(label: str, name: str, tiling: el.ExpertTiling, run, compare: bool = True, **extra) -> bool:
        """Check ``run`` (one step's 18 layers) against the chain (unless not ``compare``) and time it in a CUDA
        graph: a row of ``rows``. A tiling that does not compile or run gets a row with its error and does not end the
        sweep."""
        t0 = time.time()
        try:
            out = run().float()
            torch.cuda.synchronize()
            err = rel(out, reference) if compare else None
            us = graph_time_us(run) / LAYERS
        except Exception as failure:  # noqa: BLE001 - one tiling that does not compile must not end the sweep
            rows.append(dict(variant=f"{label}: {name}", error=f"{type(failure).__name__}: {failure}"[:300]))
            save()
            print(f"{label} {name}: failed: {failure}", flush=True)
            return False
        rows.append(dict(variant=f"{label}: {name}", us_per_layer=us, rel_vs_chain=err, tiling=asdict(tiling), **extra))
        save()
        versus = "not compared" if err is None else f"{err:.2e}"
        print(f"{label} {name}: {us:.2f} us/layer, rel vs chain {versus} ({time.time() - t0:.1f} s)", flush=True)
        return True

    for name, tiling in tilings(args.quick, args.only).items():
        work = el.ExpertWorkspace(s, s, D, F, HEADS, KV_HEADS, HEAD_DIM, p + s, dtype, device, tiling, LAYERS)
        # float16 operand rows take E4M3 weights only; the conversion by bits and the weights-first form change only
        # E4M3 weights
        fp8_only = tiling.fp8_operands != "bf16" or tiling.fp8_convert != "cvt" or tiling.fp8_weights_first
        if fp8_only and not args.fp8:
            continue
        if not fp8_only and not time_variant("persistent", name, tiling, lambda: persistent(work),
                                             attention_splits=work.n_splits, programs=work.programs):
            continue
        step_label = "Euler step kernel" if args.euler else "step kernel"
        # With --euler: the layers-only step kernel beside the Euler step kernel.
        forms = [("step kernel", dict(action_path=False))] if args.euler else []
        forms.append((step_label, {}))
        for label, form in forms if args.step and not fp8_only else ():
            time_variant(label, name, tiling, lambda: step_kernel(work, **form), compare="action_path" in form
                         or not args.euler)
        if args.fp8:
            time_variant("persistent fp8", name, tiling, lambda: persistent(work, fp8=True))
        for label, form in forms if args.fp8 and args.step else ():
            time_variant(f"{label} fp8", name, tiling, lambda: step_kernel(work, fp8=True, **form),
                         compare="action_path" in form or not args.euler)
    phase_tilings = {} if args.no_phases else {"default": el.ExpertTiling()}
    phase_tilings.update({name: tilings(False)[name] for name in args.phases_of})
    for tiling_name, tiling in phase_tilings.items():
        work = el.ExpertWorkspace(s, s, D, F, HEADS, KV_HEADS, HEAD_DIM, p + s, dtype, device, tiling, LAYERS)
        for name, mask_bits in PHASES.items():
            if args.phase and not any(text in name for text in args.phase):
                continue
            us = graph_time_us(lambda: persistent(work, mask_bits)) / LAYERS
            rows.append(dict(variant=f"phase {name} ({tiling_name} tiling)", us_per_layer=us))
            save()
            print(f"phase {name} ({tiling_name} tiling): {us:.2f} us/layer", flush=True)
    print(f"\nPi0 expert layer, prefix {p}, suffix {s}, bf16; floor {floor_us:.2f} us/layer "
          f"({layer_bytes / 1e6:.1f} MB at {bandwidth / 1e9:.0f} GB/s)")
    print(f"{'variant':<52} {'us/layer':>9} {'x floor':>8} {'rel vs chain':>13}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<52} {row['error'][:60]}")
            continue
        err = row.get("rel_vs_chain")
        print(f"{row['variant']:<52} {row['us_per_layer']:9.2f} {row['us_per_layer'] / floor_us:8.2f} "
              f"{'' if err is None else f'{err:.2e}':>13}")


if __name__ == "__main__":
    main()

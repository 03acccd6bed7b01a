"""The whole-step expert kernel (kernels/expert_step.py) against the one-layer launches and the PyTorch
reference, alone and through the triton backend (``TritonOptions(expert_launch="step")``).

CPU: Triton's interpreter with one program (see tests/test_expert_layer.py); both kernels then do the same
arithmetic in the same order, so a step launch and the chain of layer launches agree bit for bit.
"""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from cortexflow.errors import CortexFlowWarning
from cortexflow.kernels import expert_layer as el
from cortexflow.kernels import expert_step as es
from cortexflow.kernels.rope import inverse_frequencies
from cortexflow.quantization.fp8 import quantize_weight
from expert_support import GPU_TILING_EXPERT, fp8_expert_backends, tiny_pi0_call
from compile_support import run_compile_script

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILING = el.INTERPRETER_TILING if DEVICE == "cpu" else el.ExpertTiling(
    block_m=16, pair=16, block_k=16, gate_up_cols=16, out_cols=16, o_splits=2, down_splits=2, attn_rows=16,
    attn_keys=16, attn_splits=2, attn_d_parts=4, attn_merge="last", attn_v_parts=1, programs=8, num_warps=4,
    num_stages=2)
#: The attention's key ranges merged in a phase of their own, two programs a tile (one per half of the value
#: columns), 32-row tiles (``ExpertTiling.attn_merge``).
MERGE_PHASE_TILING = replace(SMALL_TILING, attn_rows=32, attn_merge="phase", attn_v_parts=2)
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 4e-2}  # rel L2 after three layers
#: 27 prefix + 6 suffix keys: two key ranges of 16-key steps with the tilings above (the range partials are merged).
LAYERS, BATCH, SEQ, PREFIX, DIM, MLP, HEADS, KV_HEADS, HEAD_DIM = 3, 2, 6, 27, 32, 64, 4, 1, 32


def _step_inputs(dtype, pi05, fp8, seed):
    """Random layers (weights ``(L, 4)``, E4M3 with scales when ``fp8``), norm factors ``(L, 2, D)``, Pi0.5
    modulation ``(L, 2, 3, D)``, input rows, positions, stacked caches ``(L, B, P + S, Hkv, Dh)`` and a mask."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    weights, scales = [], []
    for _ in range(LAYERS):
        layer = (rnd((HEADS + 2 * KV_HEADS) * HEAD_DIM, DIM, scale=DIM**-0.5), rnd(DIM, HEADS * HEAD_DIM,
                 scale=(HEADS * HEAD_DIM) ** -0.5), rnd(2 * MLP, DIM, scale=DIM**-0.5), rnd(DIM, MLP, scale=MLP**-0.5))
        if fp8:
            q = [quantize_weight(w) for w in layer]
            weights.append(tuple(w.data for w in q))
            scales.append(tuple(w.scale for w in q))
        else:
            weights.append(tuple(w.to(dtype) for w in layer))
    norm_scales = 1 + 0.2 * rnd(LAYERS, 2, DIM)
    modulation = 0.3 * rnd(LAYERS, 2, 3, DIM) if pi05 else None
    x = rnd(BATCH * SEQ, DIM).to(dtype)
    positions = (torch.arange(SEQ)[None] + torch.randint(0, PREFIX, (BATCH, 1), generator=g)).to(DEVICE)
    keys = rnd(LAYERS, BATCH, PREFIX + SEQ, KV_HEADS, HEAD_DIM).to(dtype)
    values = rnd(LAYERS, BATCH, PREFIX + SEQ, KV_HEADS, HEAD_DIM).to(dtype)
    prefix_mask = torch.rand(BATCH, PREFIX, generator=g) > 0.3
    prefix_mask[:, 0] = True
    suffix = torch.ones(SEQ, SEQ, dtype=torch.bool)
    suffix[0, 1:] = False
    mask = torch.cat([prefix_mask[:, None].expand(BATCH, SEQ, PREFIX), suffix[None].expand(BATCH, SEQ, SEQ)], 2)
    return weights, scales or None, norm_scales, modulation, x, positions, keys, values, mask.contiguous().to(DEVICE)


def _workspace(dtype, steps=1, tiling=SMALL_TILING):
    work = el.ExpertWorkspace(BATCH * SEQ, SEQ, DIM, MLP, HEADS, KV_HEADS, HEAD_DIM, PREFIX + SEQ, dtype,
                              torch.device(DEVICE), tiling, launches=steps * LAYERS)
    work.reset()
    return work


def _layer_launches(weights, scales, norm_scales, modulation, x, positions, inv_freq, keys, values, mask, work, step):
    """The step as ``L`` one-layer launches chained through the split-K partials (the backend's "layer" mode)."""
    out = work.residual
    for i, layer in enumerate(weights):
        extra = {}
        if modulation is not None:
            mod = modulation[i]
            extra = dict(attn_shift=mod[0, 1], mlp_shift=mod[1, 1], attn_gate=mod[0, 2], mlp_gate=mod[1, 2])
            if i > 0:
                extra["pending_gate"] = modulation[i - 1, 1, 2]
        el.expert_layer(x if i == 0 else out, out, *layer, norm_scales[i, 0], norm_scales[i, 1], positions, inv_freq,
                        keys[i], values[i], mask, 1e-6, HEAD_DIM**-0.5, work, HEADS, launch=step * LAYERS + i,
                        pending=i > 0, finish=i == LAYERS - 1,
                        weight_scales=None if scales is None else scales[i], **extra)
    return out


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype, fp8, tiling", [
    (torch.float32, False, SMALL_TILING), (torch.bfloat16, False, SMALL_TILING), (torch.float32, True, SMALL_TILING),
    (torch.bfloat16, True, SMALL_TILING), (torch.float32, False, MERGE_PHASE_TILING),
    (torch.bfloat16, True, MERGE_PHASE_TILING), (torch.bfloat16, True, replace(SMALL_TILING, fp8_operands="f16")),
    (torch.bfloat16, True, replace(SMALL_TILING, fp8_operands="f16", fp8_weights_first=True))],
    ids=["fp32", "bf16", "fp32-fp8", "bf16-fp8", "fp32-merge-phase", "bf16-fp8-merge-phase", "bf16-fp8-f16-operands",
         "bf16-fp8-weights-first"])
@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_step_launch_equals_the_layer_launches(dtype, fp8, tiling, pi05):
    """Three layers as one launch and as three launches: the same output and KV cache rows bit for bit (one
    interpreter program: the same operations in the same order), close to the reference; two steps in a row
    use their own barrier counters, and every program passed every barrier of both (the merge phase's too, with
    ``attn_merge="phase"``)."""
    weights, scales, norm_scales, modulation, x, positions, keys, values, mask = _step_inputs(dtype, pi05, fp8, 1)
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    tables = es.expert_weight_tables(weights, scales)
    ref_keys, ref_values = keys.clone(), values.clone()
    ref = es.expert_step_reference(x, weights, norm_scales, positions, inv_freq, ref_keys, ref_values, mask, 1e-6,
                                   HEAD_DIM**-0.5, HEADS, modulation, scales)
    layer_work, step_work = _workspace(dtype, 2, tiling), _workspace(dtype, 2, tiling)
    layer_keys, layer_values = keys.clone(), values.clone()
    for step in range(2):
        by_layer = _layer_launches(weights, scales, norm_scales, modulation, x, positions, inv_freq, layer_keys,
                                   layer_values, mask, layer_work, step)
        by_step = es.expert_step(x, step_work.residual, tables, norm_scales, positions, inv_freq, keys, values, mask,
                                 1e-6, HEAD_DIM**-0.5, step_work, HEADS, modulation, step=step)
        assert torch.equal(by_step, by_layer)
        assert torch.equal(keys, layer_keys) and torch.equal(values, layer_values)
    assert _rel(by_step, ref) <= BOUNDS[dtype]
    assert _rel(keys, ref_keys) <= BOUNDS[dtype] and _rel(values, ref_values) <= BOUNDS[dtype]
    used = 8 if tiling.attn_merge == "phase" else 7
    barriers = step_work.sync.view(2 * LAYERS, el.ExpertWorkspace.BARRIERS)
    assert (barriers[:, :used] == step_work.programs).all() and (barriers[:, used:] == 0).all()
    assert int(step_work.counters.abs().sum()) == 0


def test_step_launch_checks_its_tables_and_tensors():
    weights, scales, norm_scales, _, x, positions, keys, values, mask = _step_inputs(torch.float32, False, True, 2)
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    with pytest.raises(ValueError, match="need weight_scales"):
        es.expert_weight_tables(weights)
    mixed = [weights[0], tuple(w.float() for w in weights[1])]
    with pytest.raises(ValueError, match="are for E4M3 weights; these weights are torch.float32"):
        es.expert_weight_tables(mixed, [scales[0], scales[0]])
    wide = [weights[0], (weights[1][0], weights[1][1], weights[1][2], torch.cat([weights[1][3]] * 2, 1))]
    with pytest.raises(ValueError, match="one shape per projection"):
        es.expert_weight_tables(wide, scales[:2])
    tables = es.expert_weight_tables(weights, scales)
    assert tables.offsets.shape == (4, LAYERS) and tables.offsets[:, 0].tolist() == [0] * 4
    assert tables.offsets[1, 2] == weights[2][1].data_ptr() - weights[0][1].data_ptr()  # E4M3: one byte an element
    assert tables.scale_offsets[3, 1] * 4 == scales[1][3].data_ptr() - scales[0][3].data_ptr()
    work = _workspace(torch.float32)
    args = (positions, inv_freq, keys, values, mask, 1e-6, HEAD_DIM**-0.5, work, HEADS)
    with pytest.raises(ValueError, match=r"norm_scales \(2, 2, 32\)"):
        es.expert_step(x, work.residual, tables, norm_scales[:2], *args)
    with pytest.raises(ValueError, match="keys / values"):
        es.expert_step(x, work.residual, tables, norm_scales, positions, inv_freq, keys[:2], values[:2], mask, 1e-6,
                       HEAD_DIM**-0.5, work, HEADS)
    with pytest.raises(ValueError, match="beyond the workspace's 3 launches"):
        es.expert_step(x, work.residual, tables, norm_scales, *args, step=1)


# Pi0 with E4M3 weights in one launch per step is the step kernel's FP8 build (equal to the layer launches above)
# behind the same backend wiring as test_expert_layer's FP8 backend test: one end-to-end case, Pi0.5, suffices for
# "step"; "euler" runs both models (Pi0's action path has a middle layer and a state row, Pi0.5's adaptive final norm).
@pytest.mark.parametrize("model, fp8, launch", [("pi05", False, "step"), ("pi05", False, "euler"),
                                                ("pi0", False, "euler")], ids=["pi05-step", "pi05-euler", "pi0-euler"])
def test_backend_runs_a_step_in_one_launch(tmp_path, model, fp8, launch):
    """A tiny Pi0.5 and a tiny Pi0 in fp32 through the triton backend with ``expert_launch="step"`` (one launch a
    step for the expert layers) or "euler" (one launch a whole Euler step, the action path included): the actions of
    the PyTorch backend on the same weights, to the fp32 bound (on a GPU in replayed CUDA graphs); the step tables
    were made once, for the engine's weights."""
    import cortexflow as cf
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    fp8_triton, dequantised = fp8_expert_backends()
    config = tiny_model_config(model, chunk_size=3, num_diffusion_steps=2, num_vision_layers=1,
                               **(GPU_TILING_EXPERT if DEVICE == "cuda" else {}))
    write_checkpoint(tmp_path, config)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    noise = rng.standard_normal((3, 8)).astype(np.float32)
    state = rng.standard_normal(5)
    create = cf.create_pi0_inference if model == "pi0" else cf.create_pi05_inference
    outputs = {}
    for name, backend in (("step", (fp8_triton if fp8 else TritonBackend).configured(expert_launch=launch)),
                          ("reference", dequantised if fp8 else "pytorch")):
        # On a GPU the engines replay CUDA graphs (the Euler launches' counters and x_t are the graph's buffers).
        engine = create(tmp_path, backend=backend, device=DEVICE, dtype="float32", model_config=config,
                        use_cuda_graphs=DEVICE == "cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error", CortexFlowWarning)  # no fallback to another path
            outputs[name] = engine.predict(images, prompt_tokens=[2, 7], state=state, noise=noise)
        if name == "step":
            tables = engine.backend.per_weights(engine.weights, "expert_step_tables", lambda: None)
            assert tables.layers == config.num_decoder_layers and (tables.scales is not None) == fp8
            if launch == "euler":  # the Euler launch made its final-norm factors
                key = "euler_final_scale" if model == "pi0" else ("euler_final_scales", config.num_diffusion_steps)
                assert engine.backend.per_weights(engine.weights, key, lambda: None) is not None
    rel = np.linalg.norm(outputs["step"] - outputs["reference"]) / np.linalg.norm(outputs["reference"])
    assert rel <= 1e-5


def test_backend_runs_fp8_expert_weights_on_float16_operand_rows_in_bf16(tmp_path, monkeypatch):
    """A tiny Pi0 in bf16 whose fused expert projections are E4M3, through the triton backend's Euler launch: the
    workspace it starts (``default_tiling(fp8=True)``) keeps the rows QKV, o and gate/up multiply in float16 and
    the residual in bf16, and the actions are those of the PyTorch backend on the dequantised weights in fp32 to
    bf16's bound."""
    import cortexflow as cf
    from cortexflow.backends import triton_backend
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    started = []
    start = triton_backend.start_workspace
    monkeypatch.setattr(triton_backend, "start_workspace", lambda *args: started.append(start(*args)) or started[-1])
    fp8_triton, dequantised = fp8_expert_backends()
    config = tiny_model_config("pi0", chunk_size=3, num_diffusion_steps=2, num_vision_layers=1,
                               **(GPU_TILING_EXPERT if DEVICE == "cuda" else {}))
    write_checkpoint(tmp_path, config)
    images, noise, state = tiny_pi0_call(5)
    outputs = {}
    for name, backend, dtype in (("fp8", fp8_triton, "bfloat16"), ("reference", dequantised, "float32")):
        engine = cf.create_pi0_inference(tmp_path, backend=backend, device=DEVICE, dtype=dtype, model_config=config,
                                         use_cuda_graphs=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CortexFlowWarning)  # no fallback to another path
            outputs[name] = engine.predict(images, prompt_tokens=[2, 7], state=state, noise=noise)
    work = started[0]
    assert work.tiling.fp8_operands == "f16"
    assert (work.normed_attn.dtype, work.normed_mlp.dtype, work.attn.dtype) == (torch.float16,) * 3
    assert work.residual.dtype == torch.bfloat16
    rel = np.linalg.norm(outputs["fp8"] - outputs["reference"]) / np.linalg.norm(outputs["reference"])
    assert rel <= BOUNDS[torch.bfloat16]


def test_expert_launch_option():
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.errors import ConfigError

    assert TritonOptions().expert_launch == "euler"
    assert TritonOptions.parse("expert_launch=step").changed() == {"expert_launch": "step"}
    assert TritonOptions.parse("expert_launch=layer").changed() == {"expert_launch": "layer"}
    with pytest.raises(ConfigError, match="expert_launch must be 'layer', 'step' or 'euler'"):
        TritonOptions(expert_launch="all")


STEP_COMPILE_SCRIPT = r"""
import json, sys, torch
from cortexflow.kernels import expert_layer as el, expert_step as es
from cortexflow.kernels.runtime import CompileTarget
from cortexflow.quantization.fp8 import E4M3
from cortexflow.tools.compile_check import compile_only

meta = torch.device("meta")
layers, m, s, p, d, f, h, hkv, hd = 18, 51, 51, 300, 1024, 4096, 8, 1, 256
bf16, fp32, i64 = torch.bfloat16, torch.float32, torch.int64
e = lambda *shape, dtype=bf16: torch.empty(*shape, dtype=dtype, device=meta)
shapes = (((h + 2 * hkv) * hd, d), (d, h * hd), (2 * f, d), (d, f))
report = {}
for fp8 in (False, True):
    weights = tuple(e(*shape, dtype=E4M3 if fp8 else bf16) for shape in shapes)
    scales = tuple(e(shape[0], dtype=fp32) for shape in shapes) if fp8 else None
    tables = es.ExpertWeightTables(weights, e(4, layers, dtype=i64), scales, e(4, layers, dtype=i64) if fp8 else None,
                                   16, ())
    with compile_only(CompileTarget(arch=90, processors=132)) as launches:
        work = el.ExpertWorkspace(m, s, d, f, h, hkv, hd, p + s, bf16, meta, el.ExpertTiling(), launches=layers)
        es.expert_step(e(m, d), e(m, d), tables, e(layers, 2, d, dtype=fp32), e(1, s, dtype=i64),
                       e(hd // 2, dtype=fp32), e(layers, 1, p + s, hkv, hd), e(layers, 1, p + s, hkv, hd),
                       e(1, s, p + s, dtype=torch.bool), 1e-6, hd**-0.5, work, h, e(layers, 2, 3, d, dtype=fp32))
    (launch,) = launches
    ptx = launch.kernel.asm["ptx"]
    report[str(fp8)] = {"name": launch.name, "grid": list(launch.grid), "shared": launch.kernel.metadata.shared,
                        "cp_async_cg": ptx.count("cp.async.cg.shared.global"),
                        "cp_async_ca": ptx.count("cp.async.ca"), "scalar_b16_loads": ptx.count("ld.global.b16"),
                        "acquire_polls": ptx.count("ld.global.gpu.acquire.b32"),
                        "e4m3_cvt": "cvt.rn.f16x2.e4m3x2" in ptx}
json.dump(report, sys.stdout)
"""


def test_step_kernel_compiles_for_hopper(tmp_path):
    """The step kernel (bf16 and E4M3 weights, Pi0.5's modulation, 18 layers of Pi0's expert) through Triton's
    whole pipeline for sm_90 on ``meta`` tensors: one program per SM; the weight tiles, whose pointers come from
    the tables, still load as 16-byte ``cp.async.cg`` copies (no element-wise loads, no ``.ca`` copies); every
    barrier polls with acquire atomics; E4M3 converts in hardware."""
    report = run_compile_script(STEP_COMPILE_SCRIPT, tmp_path)
    for fp8, launch in report.items():
        assert launch["name"] == "_expert_step_kernel" and launch["grid"] == [132]
        assert launch["shared"] <= 227 * 1024
        assert launch["cp_async_cg"] > 0 and launch["cp_async_ca"] == 0 and launch["scalar_b16_loads"] == 0
        assert launch["acquire_polls"] >= 7  # one poll loop a barrier
        assert launch["e4m3_cvt"] == (fp8 == "True")


def _euler_inputs(dtype, pi05, seed):
    """An action path for :func:`expert_step`'s ``euler``: Pi0 (a middle layer, a state row before the actions,
    plain final norm) or Pi0.5 (no middle layer, every suffix row an action, adaptive final norm); action
    dimension 5 (padded to 16 in the kernel)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    a, chunk = 5, SEQ if pi05 else SEQ - 1
    mid = {} if pi05 else dict(mid_weight=rnd(DIM, DIM, scale=DIM**-0.5), mid_bias=rnd(DIM, scale=0.1))
    return es.EulerUpdate(rnd(BATCH * chunk, a), rnd(DIM, a, scale=a**-0.5), rnd(DIM, scale=0.1),
                          rnd(a, DIM, scale=DIM**-0.5).to(dtype), rnd(a, scale=0.1).to(dtype), 1 + 0.2 * rnd(DIM),
                          chunk, -0.1, final_shift=rnd(DIM, scale=0.3) if pi05 else None, **mid)


def _euler_composition(euler, x, dtype, run_layers, eps=1e-6):
    """The Euler step as ``ComputeBackend.denoising_step`` composes it: the action tokens in fp32 into the last
    ``chunk`` rows of each batch of ``x`` (rounded), the layers (``run_layers(hidden) -> out``), the final norm,
    the head (rounded to its dtype) and ``x_t + dt * v``. Returns ``(out, x_t)``."""
    tokens = euler.x_t @ euler.in_weight.T + euler.in_bias
    if euler.mid_weight is not None:
        tokens = torch.nn.functional.silu(tokens) @ euler.mid_weight.T + euler.mid_bias
    hidden = x.clone()
    hidden.view(BATCH, SEQ, DIM)[:, -euler.chunk:] = tokens.view(BATCH, euler.chunk, DIM).to(dtype)
    out = run_layers(hidden).clone()
    rows = out.view(BATCH, SEQ, DIM)[:, -euler.chunk:].reshape(-1, DIM).float()
    h = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * euler.final_scale
    if euler.final_shift is not None:
        h = h + euler.final_shift
    h = h.to(dtype).float()
    v = (h @ euler.head_weight.float().T + euler.head_bias.float()).to(euler.head_weight.dtype).float()
    return out, euler.x_t + euler.dt * v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
@pytest.mark.parametrize("layers", [LAYERS, 1], ids=["3-layers", "1-layer"])
def test_euler_step_launch_equals_its_composition(dtype, pi05, layers):
    """A whole Euler step in one launch (action tokens, the layers, final norm, action head, update of ``x_t``)
    against the same step composed of PyTorch ops around the step kernel without the action path: the residual,
    the KV cache rows and ``x_t`` agree to the dtype's rounding (fp32: the action GEMMs sum in another order);
    with one layer the kernel's two action-path barriers share a counter, which every program passed twice."""
    _check_euler_step(dtype, pi05, layers, SMALL_TILING)


@pytest.mark.parametrize("layers", [LAYERS, 1], ids=["3-layers", "1-layer"])
def test_euler_step_with_the_attention_merge_phase(layers):
    """The Euler step with the key ranges merged in a phase of their own (``attn_merge="phase"``, value columns in
    two parts): every layer's merge barrier (its 8th counter) and the action path's (the 9th) were each passed by
    every program, so the two never share a counter."""
    _check_euler_step(torch.float32, False, layers, MERGE_PHASE_TILING)


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_euler_step_with_fp8_weights_and_f16_operands(pi05):
    """The Euler step with E4M3 weights and float16 operand rows (``fp8_operands="f16"``; the final norm's rows, which
    the action head reads, are float16 too) against its composition, within bf16's rounding."""
    _check_euler_step(torch.bfloat16, pi05, LAYERS, replace(SMALL_TILING, fp8_operands="f16"), fp8=True)


def _check_euler_step(dtype, pi05, layers, tiling, fp8=False):
    weights, scales, norm_scales, modulation, x, positions, keys, values, mask = _step_inputs(dtype, pi05, fp8, 4)
    weights, norm_scales = weights[:layers], norm_scales[:layers]
    scales = None if scales is None else scales[:layers]
    modulation = None if modulation is None else modulation[:layers]
    keys, values = keys[:layers].contiguous(), values[:layers].contiguous()
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    tables = es.expert_weight_tables(weights, scales)
    euler = _euler_inputs(dtype, pi05, 5)
    x_t_before = euler.x_t.clone()

    def workspace():
        work = el.ExpertWorkspace(BATCH * SEQ, SEQ, DIM, MLP, HEADS, KV_HEADS, HEAD_DIM, PREFIX + SEQ, dtype,
                                  torch.device(DEVICE), tiling, launches=layers)
        work.reset()
        return work

    args = (positions, inv_freq)
    composed_keys, composed_values = keys.clone(), values.clone()
    plain = workspace()
    run_layers = lambda hidden: es.expert_step(hidden, plain.residual, tables, norm_scales, *args,  # noqa: E731
                                               composed_keys, composed_values, mask, 1e-6, HEAD_DIM**-0.5, plain,
                                               HEADS, modulation)
    composed_out, composed_x_t = _euler_composition(es.EulerUpdate(**{**euler.__dict__, "x_t": x_t_before.clone()}),
                                                    x, dtype, run_layers)
    work = workspace()
    hidden = x.clone()
    out = es.expert_step(hidden, work.residual, tables, norm_scales, *args, keys, values, mask, 1e-6, HEAD_DIM**-0.5,
                         work, HEADS, modulation, euler=euler)
    bound = BOUNDS[dtype]
    assert _rel(out, composed_out) <= bound
    assert _rel(keys, composed_keys) <= bound and _rel(values, composed_values) <= bound
    assert _rel(euler.x_t - x_t_before, composed_x_t - x_t_before) <= bound
    assert torch.equal(hidden, x)  # only read
    barriers = work.sync.view(layers, el.ExpertWorkspace.BARRIERS)
    action_barrier, head_barrier = int(barriers[0, -1]), int(barriers[-1, -1])
    if layers == 1:
        assert action_barrier == 2 * work.programs
    else:
        assert action_barrier == work.programs and head_barrier == work.programs
    assert (barriers[:, :7] == work.programs).all()
    assert (barriers[:, 7] == (work.programs if tiling.attn_merge == "phase" else 0)).all()


def test_euler_step_checks_its_action_path():
    weights, scales, norm_scales, modulation, x, positions, keys, values, mask = _step_inputs(torch.float32, True, False, 6)
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    tables = es.expert_weight_tables(weights, scales)
    work = _workspace(torch.float32)
    pi0, pi05 = _euler_inputs(torch.float32, False, 7), _euler_inputs(torch.float32, True, 7)

    def launch(euler, mod=modulation):
        es.expert_step(x, work.residual, tables, norm_scales, positions, inv_freq, keys, values, mask, 1e-6,
                       HEAD_DIM**-0.5, work, HEADS, mod, euler=euler)

    with pytest.raises(ValueError, match=r"x_t must be contiguous fp32 \(12, A\), got torch.float32 \(11, 5\)"):
        launch(es.EulerUpdate(**{**pi05.__dict__, "x_t": pi05.x_t[:-1]}))
    with pytest.raises(ValueError, match=r"in_weight must be contiguous \(32, 5\)"):
        launch(es.EulerUpdate(**{**pi05.__dict__, "in_weight": pi05.in_weight.T.contiguous()}))
    with pytest.raises(ValueError, match="in_bias must be fp32"):
        launch(es.EulerUpdate(**{**pi05.__dict__, "in_bias": pi05.in_bias.double()}))
    with pytest.raises(ValueError, match="chunk 7 must be 1..6"):
        launch(es.EulerUpdate(**{**pi05.__dict__, "chunk": 7}))
    with pytest.raises(ValueError, match="final_shift goes with modulation"):
        launch(pi05, mod=None)
    with pytest.raises(ValueError, match="needs plain norms"):
        launch(es.EulerUpdate(**{**pi0.__dict__, "final_shift": pi05.final_shift}))


def test_euler_launch_leaves_a_guided_step_to_the_composition(monkeypatch):
    """A real-time-chunking step (a ``guide`` that changes the velocity between the head and the update) does not
    run as one launch: the triton backend hands it to the composition, which calls the guide."""
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.ops import ComputeBackend

    calls = []
    monkeypatch.setattr(ComputeBackend, "denoising_step", lambda self, *args: calls.append(args[-1]))
    backend = TritonBackend.configured(expert_launch="euler")(torch.device(DEVICE), torch.float32)
    guide = lambda v: v  # noqa: E731
    backend.denoising_step({}, None, None, None, None, 0, -0.1, guide)
    assert calls == [guide]


def test_action_path_takes_k_ranges_of_whole_16_column_steps():
    """The action phase steps through the middle layer's K ranges (``width / down_splits`` columns) in the largest
    power of two up to 32 dividing them: Pi0's 1024 / 8 in 32-column steps; widths whose ranges are not a multiple
    of 16 columns (``tl.dot``'s least K) are refused with the reason."""
    tiling = el.ExpertTiling()
    assert es.action_k_step(1024, 8) == 32 and es.action_k_step(128, 8) == 16 and es.action_k_step(32, 2) == 16
    assert es.action_path_unsupported(1024, tiling) is None and es.action_path_unsupported(128, tiling) is None
    assert "width 64 does not split into 8 K ranges of a multiple of 16" in es.action_path_unsupported(64, tiling)
    assert es.action_path_unsupported(1000, tiling) is not None

"""The step kernel's norms folded into the weights (``ExpertTiling(norm_rows="folded")``, kernels/expert_step.py and
``_layer``'s ``FOLDED``): the o / down phases' last programs finish the residual tile by tile and store the rows' sums
of squares by column group; the QKV and gate/up phases multiply the raw residual rows by the folded weights and scale
each row in their epilogues.

Checked against the PyTorch reference on the unfolded weights (the rounding differs from the row phases': the normed
rows are never rounded, the folded weights are), a width of three column groups (a group count that is not a power of
two), two steps in a row, the counters every launch must leave at zero, the barriers that are skipped, the Euler step,
and the refusals.
"""

from dataclasses import replace

import pytest
import torch

from cortexflow.kernels import expert_layer as el
from cortexflow.kernels import expert_step as es
from cortexflow.kernels.rope import inverse_frequencies
from cortexflow.quantization.fp8 import quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PHASE_TILING = el.INTERPRETER_TILING if DEVICE == "cpu" else el.ExpertTiling(
    block_m=16, pair=16, block_k=16, gate_up_cols=16, out_cols=16, o_splits=2, down_splits=2, attn_rows=16,
    attn_keys=16, attn_splits=2, attn_d_parts=4, attn_merge="last", attn_v_parts=1, programs=8, num_warps=4,
    num_stages=2)
FOLDED_TILING = replace(PHASE_TILING, norm_rows="folded")
#: Width 96: three 32-column groups of sums of squares (o / down tiles of 2 x 16 columns).
LAYERS, BATCH, SEQ, PREFIX, DIM, MLP, HEADS, KV_HEADS, HEAD_DIM = 3, 2, 6, 27, 96, 64, 4, 1, 32
EPS = 1e-6
#: rel L2 against the fp32 reference after three layers (bf16: the residual stream and K/V rounded each layer).
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def _inputs(dtype, seed, fp8=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    weights, scales = [], []
    for _ in range(LAYERS):
        layer = (rnd((HEADS + 2 * KV_HEADS) * HEAD_DIM, DIM, scale=DIM**-0.5), rnd(DIM, HEADS * HEAD_DIM,
                 scale=(HEADS * HEAD_DIM) ** -0.5), rnd(2 * MLP, DIM, scale=DIM**-0.5), rnd(DIM, MLP, scale=MLP**-0.5))
        if fp8:
            quantised = [quantize_weight(w) for w in layer]
            weights.append(tuple(w.data for w in quantised))
            scales.append(tuple(w.scale for w in quantised))
        else:
            weights.append(tuple(w.to(dtype) for w in layer))
    norm_scales = 1 + 0.3 * rnd(LAYERS, 2, DIM)
    x = rnd(BATCH * SEQ, DIM).to(dtype)
    positions = (torch.arange(SEQ)[None] + torch.randint(0, PREFIX, (BATCH, 1), generator=g)).to(DEVICE)
    keys = rnd(LAYERS, BATCH, PREFIX + SEQ, KV_HEADS, HEAD_DIM).to(dtype)
    values = rnd(LAYERS, BATCH, PREFIX + SEQ, KV_HEADS, HEAD_DIM).to(dtype)
    prefix_mask = torch.rand(BATCH, PREFIX, generator=g) > 0.3
    prefix_mask[:, 0] = True
    suffix = torch.ones(SEQ, SEQ, dtype=torch.bool)
    suffix[0, 1:] = False
    mask = torch.cat([prefix_mask[:, None].expand(BATCH, SEQ, PREFIX), suffix[None].expand(BATCH, SEQ, SEQ)], 2)
    return weights, scales or None, norm_scales, x, positions, keys, values, mask.contiguous().to(DEVICE)


def _workspace(dtype, tiling, launches):
    work = el.ExpertWorkspace(BATCH * SEQ, SEQ, DIM, MLP, HEADS, KV_HEADS, HEAD_DIM, PREFIX + SEQ, dtype,
                              torch.device(DEVICE), tiling, launches=launches)
    work.reset()
    return work


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_folded_norms_match_the_reference_over_two_steps(dtype):
    """Three layers, two steps in a row, folded: output and K/V rows close to the reference on the unfolded weights
    and to the row-phase kernel; barriers 0 (first layer only) and 4 (never) skipped, every other passed by every
    program; the tile counters left at zero."""
    weights, _, norm_scales, x, positions, keys, values, mask = _inputs(dtype, 1)
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    ref_keys, ref_values = keys.clone(), values.clone()
    ref = es.expert_step_reference(x, weights, norm_scales, positions, inv_freq, ref_keys, ref_values, mask, EPS,
                                   HEAD_DIM**-0.5, HEADS)
    phase_keys, phase_values = keys.clone(), values.clone()
    phase_work = _workspace(dtype, PHASE_TILING, LAYERS)
    phase = es.expert_step(x, phase_work.residual, es.expert_weight_tables(weights), norm_scales, positions, inv_freq,
                           phase_keys, phase_values, mask, EPS, HEAD_DIM**-0.5, phase_work, HEADS)

    tables = es.expert_weight_tables(es.fold_norm_scales(weights, norm_scales))
    work = _workspace(dtype, FOLDED_TILING, 2 * LAYERS)
    for step in range(2):
        out = es.expert_step(x, work.residual, tables, norm_scales, positions, inv_freq, keys, values, mask, EPS,
                             HEAD_DIM**-0.5, work, HEADS, step=step)
        assert _rel(out, ref) <= BOUNDS[dtype]
        assert _rel(keys, ref_keys) <= BOUNDS[dtype] and _rel(values, ref_values) <= BOUNDS[dtype]
    assert _rel(out, phase) <= BOUNDS[dtype]
    assert _rel(out, ref) <= 1.5 * _rel(phase, ref) + 1e-6  # no worse than the row phases' rounding
    barriers = work.sync.view(2, LAYERS, el.ExpertWorkspace.BARRIERS)
    assert (barriers[:, 0, 0] == work.programs).all() and (barriers[:, 1:, 0] == 0).all()
    assert (barriers[:, :, 4] == 0).all()
    assert (barriers[:, :, [1, 2, 3, 5, 6]] == work.programs).all()
    assert int(work.tile_counters.abs().sum()) == 0 and work.tile_counters.numel() == 2 * 1 * 3


def test_folded_norms_scale_each_row_by_its_own_statistic():
    """Rows of very different sizes (a row 1000x the others): each output row is its own layer's function, i.e. the
    sums of squares of one row never reach another (fp32, against the reference)."""
    weights, _, norm_scales, x, positions, keys, values, mask = _inputs(torch.float32, 2)
    x = x.clone()
    x[3] *= 1000.0
    x[7] *= 1e-3
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    ref_keys, ref_values = keys.clone(), values.clone()
    ref = es.expert_step_reference(x, weights, norm_scales, positions, inv_freq, ref_keys, ref_values, mask, EPS,
                                   HEAD_DIM**-0.5, HEADS)
    work = _workspace(torch.float32, FOLDED_TILING, LAYERS)
    out = es.expert_step(x, work.residual, es.expert_weight_tables(es.fold_norm_scales(weights, norm_scales)),
                         norm_scales, positions, inv_freq, keys, values, mask, EPS, HEAD_DIM**-0.5, work, HEADS)
    for row in range(out.shape[0]):
        assert _rel(out[row], ref[row]) <= 1e-5, row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_folded_norms_in_the_euler_step(dtype):
    """A whole Euler step (Pi0's action path: middle layer, state row, final norm, head) with folded norms against
    the same step with row phases: ``x_t``'s update, the residual and K/V agree to the dtype's rounding."""
    weights, _, norm_scales, x, positions, keys, values, mask = _inputs(dtype, 3)
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    g = torch.Generator().manual_seed(4)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    a, chunk = 5, SEQ - 1
    base = es.EulerUpdate(rnd(BATCH * chunk, a), rnd(DIM, a, scale=a**-0.5), rnd(DIM, scale=0.1),
                          rnd(a, DIM, scale=DIM**-0.5).to(dtype), rnd(a, scale=0.1).to(dtype), 1 + 0.2 * rnd(DIM),
                          chunk, -0.1, mid_weight=rnd(DIM, DIM, scale=DIM**-0.5), mid_bias=rnd(DIM, scale=0.1))
    results = {}
    for name, tiling, layers in (("phase", PHASE_TILING, weights),
                                 ("folded", FOLDED_TILING, es.fold_norm_scales(weights, norm_scales))):
        euler = es.EulerUpdate(**{**base.__dict__, "x_t": base.x_t.clone()})
        k, v = keys.clone(), values.clone()
        work = _workspace(dtype, tiling, LAYERS)
        out = es.expert_step(x, work.residual, es.expert_weight_tables(layers), norm_scales, positions, inv_freq, k, v,
                             mask, EPS, HEAD_DIM**-0.5, work, HEADS, euler=euler)
        results[name] = (out.clone(), k, v, euler.x_t - base.x_t)
        assert int(work.tile_counters.abs().sum()) == 0
    for got, want in zip(results["folded"], results["phase"]):
        assert _rel(got, want) <= BOUNDS[dtype]


def test_folded_norms_are_refused_where_they_cannot_run():
    weights, _, norm_scales, x, positions, keys, values, mask = _inputs(torch.float32, 5)
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, torch.device(DEVICE))
    work = _workspace(torch.float32, FOLDED_TILING, LAYERS)
    tables = es.expert_weight_tables(es.fold_norm_scales(weights, norm_scales))
    modulation = torch.zeros(LAYERS, 2, 3, DIM, device=DEVICE)
    with pytest.raises(ValueError, match="plain norms"):
        es.expert_step(x, work.residual, tables, norm_scales, positions, inv_freq, keys, values, mask, EPS,
                       HEAD_DIM**-0.5, work, HEADS, modulation)
    fp8_weights, scales, *_ = _inputs(torch.bfloat16, 5, fp8=True)
    bf16_work = _workspace(torch.bfloat16, FOLDED_TILING, LAYERS)
    with pytest.raises(ValueError, match="norm_rows='phase'"):
        es.expert_step(x.bfloat16(), bf16_work.residual, es.expert_weight_tables(fp8_weights, scales), norm_scales,
                       positions, inv_freq, keys.bfloat16(), values.bfloat16(), mask, EPS, HEAD_DIM**-0.5, bf16_work,
                       HEADS)
    with pytest.raises(ValueError, match="step kernel"):
        el.expert_layer(x, work.residual, *weights[0], norm_scales[0, 0], norm_scales[0, 1], positions, inv_freq,
                        keys[0], values[0], mask, EPS, HEAD_DIM**-0.5, work, HEADS)
    assert "norm_rows 'sideways'" in el.check_expert_shapes(DIM, MLP, HEADS, KV_HEADS, HEAD_DIM,
                                                            replace(FOLDED_TILING, norm_rows="sideways"))
    assert "power of two" in el.check_expert_shapes(DIM, MLP, HEADS, KV_HEADS, HEAD_DIM,
                                                    replace(FOLDED_TILING, out_cols=24))


def test_fold_norm_scales_multiplies_the_input_columns():
    weights, _, norm_scales, *_ = _inputs(torch.float32, 6)
    folded = es.fold_norm_scales(weights, norm_scales)
    for i, (layer, new) in enumerate(zip(weights, folded)):
        torch.testing.assert_close(new[0], layer[0] * norm_scales[i, 0][None, :])
        torch.testing.assert_close(new[2], layer[2] * norm_scales[i, 1][None, :])
        assert new[1] is layer[1] and new[3] is layer[3]


def _tiny_engine_outputs(tmp_path, model, backend):
    import numpy as np

    import cortexflow as cf
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint
    from expert_support import GPU_TILING_EXPERT

    config = tiny_model_config(model, chunk_size=3, num_diffusion_steps=2, num_vision_layers=1,
                               **(GPU_TILING_EXPERT if DEVICE == "cuda" else {}))
    write_checkpoint(tmp_path, config)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    noise = rng.standard_normal((3, 8)).astype(np.float32)
    create = cf.create_pi0_inference if model == "pi0" else cf.create_pi05_inference
    engine = create(tmp_path, backend=backend, device=DEVICE, dtype="float32", model_config=config,
                    use_cuda_graphs=DEVICE == "cuda")
    return engine, engine.predict(images, prompt_tokens=[2, 7], state=rng.standard_normal(5), noise=noise)


def test_backend_runs_pi0_with_folded_norms(tmp_path):
    """``TritonOptions(expert_norms="folded")``: a tiny Pi0 in fp32 through the Euler launch with folded norms gives
    the PyTorch backend's actions to the fp32 bound, with no warning, over step tables of folded copies."""
    import warnings

    import numpy as np

    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.errors import CortexFlowWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", CortexFlowWarning)
        engine, folded = _tiny_engine_outputs(tmp_path / "a", "pi0", TritonBackend.configured(expert_norms="folded"))
    _, reference = _tiny_engine_outputs(tmp_path / "b", "pi0", "pytorch")
    assert np.linalg.norm(folded - reference) / np.linalg.norm(reference) <= 1e-5
    tables = engine.backend.per_weights(engine.weights, "expert_step_tables_folded", lambda: None)
    assert tables is not None
    assert tables.weights[0].data_ptr() != engine.weights["expert.layers.0.qkv"].data_ptr()  # a folded copy
    assert tables.weights[1].data_ptr() == engine.weights["expert.layers.0.o"].data_ptr()  # o as it is


def test_backend_keeps_row_phases_for_adaptive_norms(tmp_path):
    """Pi0.5's adaptive norms cannot be folded: one warning that says so, and the row-phase kernel's actions."""
    import numpy as np

    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.errors import CortexFlowWarning

    with pytest.warns(CortexFlowWarning, match="expert_norms='folded' does not apply.*adaptive"):
        _, folded = _tiny_engine_outputs(tmp_path / "a", "pi05", TritonBackend.configured(expert_norms="folded"))
    _, reference = _tiny_engine_outputs(tmp_path / "b", "pi05", "pytorch")
    assert np.linalg.norm(folded - reference) / np.linalg.norm(reference) <= 1e-5


def test_expert_norms_option():
    from cortexflow.backends.triton_options import TritonOptions
    from cortexflow.errors import ConfigError

    assert TritonOptions().expert_norms == "phase"
    assert TritonOptions.parse("expert_norms=folded").expert_norms == "folded"
    with pytest.raises(ConfigError, match="TritonOptions.expert_norms must be 'phase' or 'folded', got 'fused'"):
        TritonOptions(expert_norms="fused")

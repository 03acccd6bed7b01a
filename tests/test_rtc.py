"""Real-time chunking (cortexflow.models.rtc, engine.predict(prev_actions=...)) on tiny random Pi0 / Pi0.5.

Checked: the prefix-weight schedules against the paper's formula; guidance weight 0 and no previous chunk
give the unguided actions bit for bit; a guided chunk equals the paper's Algorithm 1 written out here in
its own convention (tau from 0 = noise to 1 = data, v_pi = -v) with a direct autograd VJP; the first
``inference_delay`` actions move towards the previous chunk and the jump at the splice shrinks; bad
arguments are refused with InputError / ConfigError."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cortexflow import RTCConfig, create_pi0_inference, create_pi05_inference
from cortexflow.errors import ConfigError, InputError
from cortexflow.models.flow_matching import euler_times
from cortexflow.models.rtc import guidance_weight, prefix_weights
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

CHUNK = 10
STEPS = 5
ACTION_DIM = 8


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def engine(request, tmp_path_factory):
    model_type = request.param
    config = tiny_model_config(model_type, action_dim=ACTION_DIM, chunk_size=CHUNK, num_diffusion_steps=STEPS)
    root = tmp_path_factory.mktemp(f"rtc_{model_type}")
    path = write_checkpoint(root / "ckpt", config, seed=3)
    rng = np.random.default_rng(5)
    stats = {"norm_stats": {
        "state": {"mean": rng.normal(size=ACTION_DIM).tolist(), "std": (rng.random(ACTION_DIM) + 0.5).tolist(),
                  "q01": (-1 - rng.random(ACTION_DIM)).tolist(), "q99": (1 + rng.random(ACTION_DIM)).tolist()},
        "actions": {"mean": rng.normal(size=ACTION_DIM).tolist(), "std": (rng.random(ACTION_DIM) + 0.5).tolist(),
                    "q01": (-1 - rng.random(ACTION_DIM)).tolist(), "q99": (1 + rng.random(ACTION_DIM)).tolist()},
    }}
    stats_path = root / "norm_stats.json"
    stats_path.write_text(json.dumps(stats))
    create = create_pi05_inference if model_type == "pi05" else create_pi0_inference
    return create(path, num_views=2, device="cpu", dtype="float32", use_cuda_graphs=False, progress=False,
                  chunk_size=CHUNK, model_config={"num_vision_heads": 4, "num_diffusion_steps": STEPS},
                  norm_stats_path=str(stats_path))


def observation(engine, seed):
    rng = np.random.default_rng(seed)
    size = engine.config.image_size
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(1, engine.config.vocab_size, 12).tolist()
    state = rng.standard_normal(ACTION_DIM).astype(np.float32)
    noise = rng.standard_normal((CHUNK, ACTION_DIM)).astype(np.float32)
    return dict(observation_images=images, prompt_tokens=tokens, state=state, noise=noise)


def previous_chunk(engine, executed):
    """A chunk from another observation and noise, with its first ``executed`` actions already done."""
    return engine.predict(**observation(engine, 101))[executed:]


# ---- the schedule and the guidance weight --------------------------------------------------------
@pytest.mark.parametrize("delay,end", [(0, 10), (2, 7), (3, 3), (4, 9)])
def test_prefix_weights_follow_the_paper(delay, end):
    weights = prefix_weights(12, delay, end, "exp").numpy()
    for i, w in enumerate(weights):
        if i < delay:
            expected = 1.0
        elif i < end:
            c = (end - i) / (end - delay + 1)
            expected = c * (math.exp(c) - 1) / (math.e - 1)
        else:
            expected = 0.0
        assert w == pytest.approx(expected, abs=1e-7)
    linear = prefix_weights(12, delay, end, "linear").numpy()
    assert np.all(np.diff(linear[delay:end]) < 0) if end - delay > 1 else True
    assert prefix_weights(12, delay, end, "ones").numpy().tolist() == [1.0] * end + [0.0] * (12 - end)
    assert prefix_weights(12, delay, end, "zeros").numpy().tolist() == [1.0] * delay + [0.0] * (12 - delay)


def test_guidance_weight_is_the_clipped_paper_formula():
    beta = 5.0
    for t in (1.0, 0.9, 0.5, 0.2, 0.0):
        tau = 1.0 - t
        if 0 < tau < 1:
            r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
            expected = min(beta, (1 - tau) / (tau * r2))
        else:
            expected = beta
        assert guidance_weight(t, beta) == pytest.approx(expected, rel=1e-12)
    assert guidance_weight(0.5, beta) == pytest.approx(2.0)


# ---- bit-identity where guidance does nothing ----------------------------------------------------
def test_no_previous_chunk_and_zero_guidance_are_unguided_bit_for_bit(engine):
    obs = observation(engine, 1)
    plain = engine.predict(**obs)
    assert np.array_equal(engine.predict(**obs, rtc=RTCConfig()), plain)
    zero = engine.predict(**obs, prev_actions=previous_chunk(engine, 3), inference_delay=2,
                          rtc=RTCConfig(max_guidance_weight=0.0))
    assert np.array_equal(zero, plain)


# ---- against the paper's algorithm written out in its own convention -----------------------------
def velocity_context(engine, obs):
    """What ``model.velocity`` reads for one observation: the prefix KV cache (computed without autograd), the
    suffix mask and positions, and Pi0's state."""
    model, weights = engine.model, engine.weights
    sample = engine.preprocessor(obs["observation_images"], None, obs["state"], obs["prompt_tokens"], None)
    buffers = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    with torch.no_grad():
        tokens = engine.backend.vision_encoder(model, weights, {"images": buffers["images"]})
        prefix = engine.backend.transformer_encoder(model, weights, {
            "image_tokens": tokens, "image_masks": buffers["image_masks"],
            "token_ids": buffers["token_ids"], "token_mask": buffers["token_mask"]})
    mask = model.suffix_attention_mask(prefix["prefix_mask"], CHUNK)
    start = prefix["prefix_mask"].long().sum(dim=1, keepdim=True)
    ctx = dict(prefix, suffix_mask=mask, suffix_positions=start + torch.arange(mask.shape[1])[None, :])
    if "state" in buffers:
        ctx["state"] = buffers["state"]
    return ctx


def paper_algorithm_1(engine, obs, prev_model_space, delay, end, beta):
    """Algorithm 1 of the paper, literally: tau from 0 to 1, A <- A + 1/n (v_pi + w g), with the model's
    velocity as v_pi = -v(x, t = 1 - tau) and g the VJP of the predicted clean chunk A + (1 - tau) v_pi."""
    model, weights = engine.model, engine.weights
    ctx = velocity_context(engine, obs)
    W = torch.zeros(CHUNK, ACTION_DIM, dtype=torch.float64)
    for i in range(CHUNK):
        if i < delay:
            W[i] = 1.0
        elif i < end:
            c = (end - i) / (end - delay + 1)
            W[i] = c * math.expm1(c) / math.expm1(1.0)
    Y = torch.zeros(CHUNK, ACTION_DIM)
    Y[: len(prev_model_space)] = torch.from_numpy(prev_model_space)
    A = torch.from_numpy(obs["noise"])[None].float()
    n = STEPS
    for t in euler_times(n):
        tau = 1.0 - t
        x = A.detach().requires_grad_(True)
        v_pi = -model.velocity(engine.backend, weights, x, t, ctx).float()
        clean = x + (1.0 - tau) * v_pi
        e = ((Y[None] - clean) * W[None].float()).detach()
        (g,) = torch.autograd.grad(clean, x, e)
        w = beta if tau <= 0 else min(beta, (1 - tau) / (tau * ((1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2))))
        A = (A + float(np.float32(-1.0 / n)) * -(v_pi.detach() + w * g)).detach()
    return engine.postprocessor(A[0].numpy())


def test_guided_chunk_equals_the_papers_algorithm(engine):
    obs = observation(engine, 2)
    prev = previous_chunk(engine, 3)                       # 7 actions left of the previous chunk
    guided = engine.predict(**obs, prev_actions=prev, inference_delay=2)
    reference = paper_algorithm_1(engine, obs, engine.postprocessor.to_model_space(prev, None), 2, len(prev), 5.0)
    scale = np.abs(reference).max()
    assert np.abs(guided - reference).max() <= 1e-5 * scale
    assert not np.allclose(guided, engine.predict(**obs), atol=1e-3 * scale)   # the guidance did something


def lerobot_identity_guidance(engine, obs, prev_model_space, delay, horizon, beta):
    """LeRobot 0.6.1's ``RTCProcessor.denoise_step`` written out in its convention (time from 1 to 0): the
    velocity ``v`` is evaluated before ``x_t`` requires grad, so its correction is the weighted error itself;
    prefix weights: ones for the first ``delay`` rows, ``linspace(1, 0, n + 2)[1:-1]`` over the next
    ``n = horizon - delay``, zeros after; ``w = min(beta, c (tau'^2 + tau^2) / tau'^2)`` with ``tau = 1 - time``,
    ``tau' = 1 - tau`` and ``c = tau' / tau``; the step ``x <- x + dt (v - w * correction)``."""
    model, weights = engine.model, engine.weights
    ctx = velocity_context(engine, obs)
    with torch.no_grad():
        n = horizon - delay
        w_rows = torch.cat([torch.ones(delay), torch.linspace(1, 0, n + 2)[1:-1], torch.zeros(CHUNK - horizon)])
        prev = torch.zeros(1, CHUNK, ACTION_DIM)
        prev[0, : len(prev_model_space)] = torch.from_numpy(prev_model_space)
        x = torch.from_numpy(obs["noise"])[None].float()
        dt = float(np.float32(-1.0 / STEPS))
        for time in euler_times(STEPS):
            v = model.velocity(engine.backend, weights, x, time, ctx).float()
            err = (prev - (x - time * v)) * w_rows[None, :, None]
            tau = torch.tensor(1.0 - time)
            c = torch.nan_to_num((1 - tau) / tau, posinf=beta)
            w = torch.minimum(torch.nan_to_num(c * ((1 - tau) ** 2 + tau**2) / (1 - tau) ** 2, posinf=beta),
                              torch.tensor(beta))
            x = x + dt * (v - w * err)
    return engine.postprocessor(x[0].numpy())


def test_identity_jacobian_equals_lerobots_rtc_formula(engine):
    obs = observation(engine, 4)
    prev = previous_chunk(engine, 2)                       # 8 actions left
    rtc = RTCConfig(max_guidance_weight=10.0, schedule="linear", jacobian="identity")
    # LeRobot's execution_horizon is where the guided overlap ends (row 8); CortexFlow's is the paper's s, the
    # rows executed before the next chunk starts: the overlap ends at chunk - s.
    guided = engine.predict(**obs, prev_actions=prev, inference_delay=3, execution_horizon=CHUNK - 8, rtc=rtc)
    reference = lerobot_identity_guidance(engine, obs, engine.postprocessor.to_model_space(prev, None), 3, 8, 10.0)
    scale = np.abs(reference).max()
    assert np.abs(guided - reference).max() <= 1e-5 * scale
    vjp = engine.predict(**obs, prev_actions=prev, inference_delay=3, execution_horizon=CHUNK - 8,
                         rtc=RTCConfig(max_guidance_weight=10.0, schedule="linear"))
    assert not np.allclose(guided, vjp, atol=1e-4 * scale)   # the two Jacobians differ on a real expert
    with pytest.raises(ConfigError, match="jacobian"):
        RTCConfig(jacobian="none")


def test_guidance_pulls_the_start_of_the_chunk_to_the_previous_one(engine):
    delay = 3
    gaps_plain, gaps_guided, jumps_plain, jumps_guided = [], [], [], []
    for seed in range(3):
        obs = observation(engine, 10 + seed)
        prev = previous_chunk(engine, 2)
        plain = engine.predict(**obs)
        guided = engine.predict(**obs, prev_actions=prev, inference_delay=delay)
        gaps_plain.append(np.linalg.norm(plain[:delay] - prev[:delay]))
        gaps_guided.append(np.linalg.norm(guided[:delay] - prev[:delay]))
        # the robot executes prev[:delay], then switches to the new chunk: at index `delay` it does new[delay]
        # where the old plan would have done prev[delay]
        jumps_plain.append(np.linalg.norm(plain[delay] - prev[delay]))
        jumps_guided.append(np.linalg.norm(guided[delay] - prev[delay]))
    assert np.mean(gaps_guided) < 0.5 * np.mean(gaps_plain)
    assert np.mean(jumps_guided) < np.mean(jumps_plain)


def test_only_the_given_action_dims_are_guided(engine):
    obs = observation(engine, 4)
    prev = previous_chunk(engine, 2)
    full = engine.predict(**obs, prev_actions=prev, inference_delay=2)
    head = engine.predict(**obs, prev_actions=prev[:, :3], inference_delay=2)
    plain = engine.predict(**obs)
    assert np.linalg.norm(head[:2, :3] - prev[:2, :3]) < np.linalg.norm(plain[:2, :3] - prev[:2, :3])
    assert not np.array_equal(head, full)


def test_predict_batch_guides_each_sample_like_predict(engine):
    obs = [observation(engine, 20 + i) for i in range(2)]
    prevs = [previous_chunk(engine, 2), previous_chunk(engine, 4)]
    singles = [engine.predict(**o, prev_actions=p, inference_delay=d) for o, p, d in zip(obs, prevs, (1, 2))]
    batch = engine.predict_batch(
        [o["observation_images"] for o in obs], None, [o["state"] for o in obs],
        batch_prompt_tokens=[o["prompt_tokens"] for o in obs], noise=np.stack([o["noise"] for o in obs]),
        batch_prev_actions=prevs, batch_inference_delays=[1, 2])
    np.testing.assert_allclose(batch, np.stack(singles), rtol=0, atol=1e-5 * np.abs(batch).max())


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_rtc_arguments_are_refused(engine):
    obs = observation(engine, 6)
    prev = previous_chunk(engine, 2)
    with pytest.raises(InputError, match="inference_delay"):
        engine.predict(**obs, prev_actions=prev, inference_delay=len(prev) + 1)
    with pytest.raises(InputError, match="prev_actions has shape"):
        engine.predict(**obs, prev_actions=np.zeros((CHUNK + 1, ACTION_DIM)), inference_delay=0)
    with pytest.raises(InputError, match="prev_actions has shape"):
        engine.predict(**obs, prev_actions=np.zeros(ACTION_DIM), inference_delay=0)
    with pytest.raises(InputError, match="numeric"):
        engine.predict(**obs, prev_actions=[[1.0, 2.0], [3.0]], inference_delay=0)
    with pytest.raises(InputError, match="NaN"):
        engine.predict(**obs, prev_actions=np.full((3, ACTION_DIM), np.nan), inference_delay=0)
    with pytest.raises(InputError, match="execution_horizon"):
        engine.predict(**obs, prev_actions=prev, execution_horizon=CHUNK)
    with pytest.raises(InputError, match="rtc must be"):
        engine.predict(**obs, prev_actions=prev, rtc={"max_guidance_weight": 1})
    with pytest.raises(ConfigError, match="max_guidance_weight"):
        RTCConfig(max_guidance_weight=-1)
    with pytest.raises(ConfigError, match="schedule"):
        RTCConfig(schedule="cosine")


def test_backends_without_guided_decoding_refuse_rtc(engine):
    obs = observation(engine, 7)
    backend = engine.backend
    try:
        engine.backend = type("Fused", (type(backend),), {"supports_guided_decoding": False, "name": "fused"})(
            backend.device, backend.dtype)
        with pytest.raises(ConfigError, match="backend='pytorch'"):
            engine.predict(**obs, prev_actions=previous_chunk(engine, 2), inference_delay=1)
    finally:
        engine.backend = backend


def test_identity_guidance_needs_only_a_backend_that_runs_the_loop(engine):
    obs = observation(engine, 8)
    prev = previous_chunk(engine, 2)
    backend = engine.backend
    identity = RTCConfig(jacobian="identity")
    try:
        # a backend that cannot differentiate the loop but runs it: the identity guidance works, the VJP is refused
        engine.backend = type("Fused", (type(backend),), {"supports_guided_decoding": False, "name": "fused"})(
            backend.device, backend.dtype)
        fused = engine.predict(**obs, prev_actions=prev, inference_delay=1, rtc=identity)
        with pytest.raises(ConfigError, match="jacobian='identity'"):
            engine.predict(**obs, prev_actions=prev, inference_delay=1)
        # an exported loop (ONNX) runs neither
        engine.backend = type("Exported", (type(backend),), {"supports_guided_decoding": False, "name": "exported",
                                                             "runs_denoising_loop": False})(backend.device, backend.dtype)
        with pytest.raises(ConfigError, match="runs the model's denoising loop"):
            engine.predict(**obs, prev_actions=prev, inference_delay=1, rtc=identity)
    finally:
        engine.backend = backend
    assert np.array_equal(fused, engine.predict(**obs, prev_actions=prev, inference_delay=1, rtc=identity))


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_identity_guidance_on_the_fused_triton_loop_matches_pytorch(tmp_path, model_type):
    """The Triton backend's table-driven denoising loop (fused expert layers; on the GPU, or under the interpreter
    on a CPU) applies the identity-Jacobian guidance per step: the same chunk as the PyTorch backend's op-by-op loop."""
    pytest.importorskip("triton")
    from cortexflow.backends.triton_backend import TritonBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"

    config = tiny_model_config(model_type, action_dim=ACTION_DIM, chunk_size=4, num_diffusion_steps=3,
                               num_vision_layers=1, image_size=56)
    write_checkpoint(tmp_path, config, seed=2)
    create = create_pi05_inference if model_type == "pi05" else create_pi0_inference
    rng = np.random.default_rng(3)
    obs = dict(observation_images=rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8), prompt_tokens=[2, 7, 8, 9],
               state=rng.standard_normal(ACTION_DIM).astype(np.float32),
               noise=rng.standard_normal((4, ACTION_DIM)).astype(np.float32))
    prev = rng.standard_normal((3, ACTION_DIM)).astype(np.float32)
    rtc = RTCConfig(jacobian="identity", max_guidance_weight=5.0)
    out = {}
    for name, backend in (("pytorch", "pytorch"), ("triton", TritonBackend)):
        engine = create(tmp_path, backend=backend, device=device, dtype="float32", model_config=config,
                        use_cuda_graphs=False, progress=False)
        out[name] = engine.predict(**obs, prev_actions=prev, inference_delay=1, rtc=rtc)
        out[name + "_plain"] = engine.predict(**obs)
    assert engine.backend.table_denoising(engine.weights, engine.model.expert())   # the fused loop ran
    rel = np.linalg.norm(out["triton"] - out["pytorch"]) / np.linalg.norm(out["pytorch"])
    assert rel < 1e-4, rel
    moved = np.linalg.norm(out["triton"] - out["triton_plain"]) / np.linalg.norm(out["triton_plain"])
    assert moved > 1e-2, moved   # the guidance changed the chunk

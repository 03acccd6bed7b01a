"""Flow-matching sampling: openpi's Euler schedule (t from 1 to 0, fp32 time accumulation), the Euler
integrator against closed forms, the sinusoidal time embedding, and the engine's decoder loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cortexflow import create_pi0_inference, create_pi05_inference
from cortexflow.models.flow_matching import euler_integrate, euler_times, sinusoidal_time_embedding
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

# openpi: t = 1.0 (fp32), dt = -1/10, `while t >= -dt/2: ...; t = t + dt`, every add rounded to fp32.
# These are the IEEE fp32 results (1 - 0.1f = 0.9f, then 0.79999995, 0.6999999, ...), written out so the
# test does not re-derive them with the code under test.
OPENPI_TIMES_10 = [
    1.0,
    0.8999999761581421,
    0.7999999523162842,
    0.6999999284744263,
    0.5999999046325684,
    0.49999991059303284,
    0.3999999165534973,
    0.2999999225139618,
    0.19999992847442627,
    0.09999992698431015,
]


def torch_fp32_schedule(num_steps: int) -> list[float]:
    """The schedule as openpi's PyTorch port runs it: an fp32 tensor plus a Python float."""
    t = torch.tensor(1.0, dtype=torch.float32)
    dt = -1.0 / num_steps
    out = []
    while t >= -dt / 2:
        out.append(t.item())
        t = t + dt
    return out


def test_euler_times_10_matches_openpi_fp32():
    times = euler_times(10)
    assert len(times) == 10
    assert times[0] == 1.0
    assert times == OPENPI_TIMES_10
    assert times == torch_fp32_schedule(10)
    # fp32 values (not the decimal 0.7): every entry is exactly representable in fp32.
    assert all(float(np.float32(t)) == t for t in times)
    assert times[3] != 0.7 and abs(times[3] - 0.7) < 1e-6


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 7, 10, 16, 32, 50, 100])
def test_euler_times_has_exactly_num_steps_values(num_steps):
    times = euler_times(num_steps)
    assert len(times) == num_steps
    assert times[0] == 1.0
    assert times == torch_fp32_schedule(num_steps)
    expected = 1.0 - np.arange(num_steps) / num_steps
    np.testing.assert_allclose(times, expected, rtol=0, atol=num_steps * 1.2e-7)
    assert all(a > b for a, b in zip(times, times[1:]))
    assert times[-1] > 0.5 / num_steps  # the last evaluation is at t ~ 1/N, never at 0


def _noise(seed: int, shape=(2, 5, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.2


@pytest.mark.parametrize("num_steps", [1, 3, 10, 50])
def test_euler_constant_velocity(num_steps):
    noise = _noise(num_steps)
    c = torch.randn(noise.shape, generator=torch.Generator().manual_seed(100 + num_steps))
    out = euler_integrate(lambda x, t: c, noise, num_steps)
    assert out.dtype == torch.float32 and out.shape == noise.shape
    expected = noise.double() - c.double()
    err = (out.double() - expected).abs().max().item()
    assert err <= num_steps * 4e-7 * (1 + expected.abs().max().item()), err


@pytest.mark.parametrize("num_steps", [1, 3, 10, 50])
def test_euler_linear_velocity_closed_form(num_steps):
    """v(x, t) = x: each step multiplies by (1 - 1/N), so x(0) = noise * (1 - 1/N)^N."""
    noise = _noise(200 + num_steps)
    calls = []

    def velocity(x, t):
        calls.append(t)
        return x

    out = euler_integrate(velocity, noise, num_steps)
    assert calls == euler_times(num_steps)
    expected = noise.double() * (1.0 - 1.0 / num_steps) ** num_steps
    if num_steps == 1:
        assert out.abs().max().item() == 0.0  # one step of size 1 lands exactly on 0
        return
    rel = ((out.double() - expected).norm() / expected.norm()).item()
    assert rel <= num_steps * 2e-7, rel
    # ... and not, say, N-1 or N+1 steps.
    for wrong in (num_steps - 1, num_steps + 1):
        other = noise.double() * (1.0 - 1.0 / num_steps) ** wrong
        assert ((out.double() - other).norm() / other.norm()).item() > 1e-3


@pytest.mark.parametrize("num_steps", [3, 10, 50])
def test_euler_time_dependent_velocity(num_steps):
    """v(x, t) = t: x(0) = noise - sum_k(t_k) / N with t_k the fp32 schedule (~ noise - (N+1)/(2N))."""
    noise = _noise(300 + num_steps)
    out = euler_integrate(lambda x, t: torch.full_like(x, t), noise, num_steps)
    total = sum(euler_times(num_steps))
    expected = noise.double() - total / num_steps
    err = (out.double() - expected).abs().max().item()
    assert err <= num_steps * 4e-7, err
    closed = noise.double() - (num_steps + 1) / (2 * num_steps)
    assert (out.double() - closed).abs().max().item() <= 1e-5
    # t really starts at 1 (a schedule starting at 1 - 1/N would be off by 1/N on average).
    shifted = noise.double() - (num_steps - 1) / (2 * num_steps)
    assert (out.double() - shifted).abs().min().item() > 0.5 / num_steps


def test_euler_keeps_x_in_fp32_whatever_the_velocity_dtype():
    noise = _noise(400)
    seen = []

    def bf16_velocity(x, t):
        seen.append(x.dtype)
        return (0.5 * x).to(torch.bfloat16)

    out = euler_integrate(bf16_velocity, noise, 4)
    assert out.dtype == torch.float32
    assert seen == [torch.float32] * 4
    expected = noise.double() * 0.875**4  # bf16 rounding of v only, x accumulates in fp32
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2


def numpy_time_embedding(t: float, dim: int) -> np.ndarray:
    half = dim // 2
    i = np.arange(half, dtype=np.float64)
    period = 4e-3 * 1000.0 ** (i / (half - 1))  # 4e-3 * (4.0 / 4e-3) ** fraction
    angle = 2.0 * np.pi * t / period
    return np.concatenate([np.sin(angle), np.cos(angle)])


@pytest.mark.parametrize("dim", [32, 1024])
@pytest.mark.parametrize("t", [1.0, 0.8999999761581421, 0.5, 0.09999992698431015, 0.0])
def test_sinusoidal_time_embedding_matches_formula(dim, t):
    emb = sinusoidal_time_embedding(t, dim, 3, torch.device("cpu"))
    assert emb.shape == (3, dim) and emb.dtype == torch.float32
    expected = numpy_time_embedding(t, dim)
    for row in emb:
        np.testing.assert_allclose(row.numpy(), expected, rtol=0, atol=2e-7)
    if t == 0.0:  # sine half first
        assert np.all(emb[0, : dim // 2].numpy() == 0) and np.all(emb[0, dim // 2 :].numpy() == 1)


# ---- the engine's decoder loop --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_matching")
    return {
        model_type: write_checkpoint(root / model_type, tiny_model_config(model_type, max_token_len=12), seed=4)
        for model_type in ("pi0", "pi05")
    }


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
@pytest.mark.parametrize("num_steps", [1, 4, 7])
def test_engine_runs_num_steps_euler_steps_from_t1(checkpoint_dirs, model_type, num_steps, monkeypatch):
    """Replace the model's velocity by known functions: the engine must return their Euler closed forms."""
    create = create_pi05_inference if model_type == "pi05" else create_pi0_inference
    chunk, action_dim = 6, 8
    engine = create(
        checkpoint_dirs[model_type],
        num_views=2,
        device="cpu",
        dtype="float32",
        use_cuda_graphs=False,
        progress=False,
        model_config={"num_vision_heads": 4, "max_token_len": 12},
        chunk_size=chunk,
        num_steps=num_steps,
    )
    assert engine.config.num_diffusion_steps == num_steps
    rng = np.random.default_rng(num_steps)
    images = rng.uniform(-1, 1, size=(2, 224, 224, 3)).astype(np.float32)
    state = rng.uniform(-1, 1, size=action_dim).astype(np.float32) if model_type == "pi0" else None
    tokens = rng.integers(4, 320, size=5)
    noise = rng.standard_normal((chunk, action_dim)).astype(np.float32)
    constant = torch.from_numpy(rng.standard_normal((1, chunk, action_dim)).astype(np.float32))

    model_cls = type(engine.model)
    calls: list[tuple[float, tuple[int, ...], torch.dtype]] = []

    def constant_velocity(self, ops, weights, x_t, t, ctx):
        calls.append((t, tuple(x_t.shape), x_t.dtype))
        assert len(ctx["kv_cache"]) == engine.config.num_decoder_layers  # called with the real prefix
        return constant.expand_as(x_t).clone()

    monkeypatch.setattr(model_cls, "velocity", constant_velocity)
    out = np.array(engine.predict(images, state=state, prompt_tokens=tokens, noise=noise))
    assert [c[0] for c in calls] == euler_times(num_steps)
    assert calls[0][0] == 1.0
    assert all(shape == (1, chunk, action_dim) and dtype == torch.float32 for _, shape, dtype in calls)
    np.testing.assert_allclose(out, noise - constant[0].numpy(), rtol=0, atol=num_steps * 1e-6)

    def linear_velocity(self, ops, weights, x_t, t, ctx):
        return x_t

    monkeypatch.setattr(model_cls, "velocity", linear_velocity)
    out = np.array(engine.predict(images, state=state, prompt_tokens=tokens, noise=noise))
    expected = noise.astype(np.float64) * (1.0 - 1.0 / num_steps) ** num_steps
    np.testing.assert_allclose(out, expected, rtol=0, atol=num_steps * 1e-6)

    def time_velocity(self, ops, weights, x_t, t, ctx):
        return torch.full_like(x_t, t)

    monkeypatch.setattr(model_cls, "velocity", time_velocity)
    out = np.array(engine.predict(images, state=state, prompt_tokens=tokens, noise=noise))
    expected = noise.astype(np.float64) - sum(euler_times(num_steps)) / num_steps
    np.testing.assert_allclose(out, expected, rtol=0, atol=num_steps * 1e-6)

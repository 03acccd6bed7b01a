"""End-to-end semantics of Pi0 / Pi0.5 engines on tiny random checkpoints (CPU, fp32).

Masked views and padding tokens must behave as if they were absent (openpi's positions are the cumsum
of valid tokens), both checkpoint layouts must load the same model, a batch must equal its items run
one by one, and fixed noise must make calls reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cortexflow import create_pi0_inference, create_pi05_inference
from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.models.gemma import project_qkv
from cortexflow.models.pi0 import Pi0Model, Pi05Model
from cortexflow.random_checkpoint import random_weights, tiny_model_config, write_checkpoint

MODEL_TYPES = ("pi0", "pi05")
CHUNK = 5
STEPS = 3
MAX_LEN = 16
PROMPT_LEN = 7
FP32_REL = 1e-5


def rel_diff(a, b) -> tuple[float, float]:
    """(‖a-b‖/‖b‖, max|a-b|) in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    norm = np.linalg.norm(b)
    assert norm > 0
    return float(np.linalg.norm(a - b) / norm), float(np.abs(a - b).max())


def assert_same(a, b, rel: float = FP32_REL, what: str = "") -> None:
    r, m = rel_diff(a, b)
    assert r <= rel, f"{what}: relative difference {r:.3e} > {rel:.1e} (max |Δ| {m:.3e})"


def assert_differs(a, b, rel: float = 1e-3, what: str = "") -> None:
    r, m = rel_diff(a, b)
    assert r > rel, f"{what}: expected a visible change, got relative difference {r:.3e} (max |Δ| {m:.3e})"


def model_config_for(model_type: str):
    return tiny_model_config(model_type, max_token_len=MAX_LEN, chunk_size=CHUNK, num_diffusion_steps=STEPS)


# The loader infers every dimension from tensor shapes except the vision head count; head count, chunk,
# steps and prompt length come from config.json when there is one, else from the published defaults.
OVERRIDES = {"num_vision_heads": 4, "num_diffusion_steps": STEPS, "max_token_len": MAX_LEN}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(model_type, layout): path}, both layouts holding the very same weights."""
    root = tmp_path_factory.mktemp("pi0_semantics")
    out = {}
    for model_type in MODEL_TYPES:
        config = model_config_for(model_type)
        weights = random_weights(config, seed=7 if model_type == "pi0" else 8)
        for layout in ("openpi", "lerobot"):
            out[model_type, layout] = write_checkpoint(
                root / f"{model_type}_{layout}", config, seed=1, layout=layout, weights=weights
            )
    return out


@pytest.fixture(scope="module")
def engines(checkpoints):
    """Cached engine factory: engines(model_type, num_views, max_len=MAX_LEN, layout="openpi", overrides=True)."""
    cache = {}

    def get(model_type, num_views, max_len=MAX_LEN, layout="openpi", overrides=True):
        key = (model_type, num_views, max_len, layout, overrides)
        if key not in cache:
            create = create_pi05_inference if model_type == "pi05" else create_pi0_inference
            cache[key] = create(
                checkpoints[model_type, layout],
                num_views=num_views,
                device="cpu",
                dtype="float32",
                use_cuda_graphs=False,
                progress=False,
                model_config=dict(OVERRIDES) if overrides else {"num_vision_heads": 4},
                chunk_size=CHUNK,
                max_tokenize_len=max_len,
            )
        return cache[key]

    return get


def observation(model_type: str, num_views: int, seed: int, action_dim: int = 8) -> dict:
    """Random float images in [-1, 1] (already 224 px), prompt token ids, state (Pi0 only), noise."""
    rng = np.random.default_rng(seed)
    obs = {
        "images": rng.uniform(-1, 1, size=(num_views, 224, 224, 3)).astype(np.float32),
        "prompt_tokens": rng.integers(4, 320, size=PROMPT_LEN),
        "noise": rng.standard_normal((CHUNK, action_dim)).astype(np.float32),
    }
    if model_type == "pi0":
        obs["state"] = rng.uniform(-1, 1, size=action_dim).astype(np.float32)
    return obs


def run(engine, obs, images=None, image_masks=None, noise=None, prompt_tokens=None):
    # np.array(...) copies, so these tests do not depend on the engine returning fresh arrays
    # (that is checked on its own by test_returned_actions_survive_the_next_call).
    return np.array(engine.predict(
        obs["images"] if images is None else images,
        state=obs.get("state"),
        prompt_tokens=obs["prompt_tokens"] if prompt_tokens is None else prompt_tokens,
        noise=obs["noise"] if noise is None else noise,
        image_masks=image_masks,
    ))


# ---- masked views -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("masked", [2, 1, 0])
def test_masked_view_equals_removed_view(engines, model_type, masked):
    three, two = engines(model_type, 3), engines(model_type, 2)
    obs = observation(model_type, 3, seed=100 + masked)
    mask = [True, True, True]
    mask[masked] = False
    kept = [v for v in range(3) if v != masked]
    with_mask = run(three, obs, image_masks=mask)
    without = run(two, obs, images=obs["images"][kept])
    assert with_mask.shape == (CHUNK, 8)
    assert_same(with_mask, without, what=f"{model_type}: view {masked} masked vs removed")
    # Masking is not a no-op: all three views valid gives another result.
    assert_differs(run(three, obs), with_mask, what="masking a view changes the actions")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_masked_view_pixels_are_ignored_valid_ones_are_not(engines, model_type):
    engine = engines(model_type, 3)
    obs = observation(model_type, 3, seed=200)
    mask = [True, False, True]
    base = run(engine, obs, image_masks=mask)
    rng = np.random.default_rng(201)
    changed_masked = obs["images"].copy()
    changed_masked[1] = rng.uniform(-1, 1, size=changed_masked[1].shape)
    assert_same(run(engine, obs, images=changed_masked, image_masks=mask), base, rel=1e-6,
                what="pixels of a masked view")
    changed_valid = obs["images"].copy()
    changed_valid[2] = rng.uniform(-1, 1, size=changed_valid[2].shape)
    assert_differs(run(engine, obs, images=changed_valid, image_masks=mask), base, what="pixels of a valid view")


# ---- padding tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padding_tokens_do_not_change_actions(engines, model_type):
    short, long = engines(model_type, 2, max_len=12), engines(model_type, 2, max_len=20)
    assert short.config.max_token_len == 12 and long.config.max_token_len == 20
    obs = observation(model_type, 2, seed=300)
    a_short, a_long = run(short, obs), run(long, obs)
    assert_same(a_short, a_long, what=f"{model_type}: 5 vs 13 padding tokens")
    # The prompt matters, so the equality above is not vacuous.
    other = obs["prompt_tokens"].copy()
    other[3] = (other[3] + 17) % 320
    assert_differs(run(short, obs, prompt_tokens=other), a_short, rel=1e-4, what="one prompt token changed")


# ---- checkpoint layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_openpi_and_lerobot_layouts_give_identical_actions(engines, model_type):
    openpi = engines(model_type, 2)
    # The LeRobot engine gets chunk / steps / prompt length from the config.json write_checkpoint made.
    lerobot = engines(model_type, 2, layout="lerobot", overrides=False, max_len=None)
    assert openpi.checkpoint_report.layout == "openpi"
    assert lerobot.checkpoint_report.layout == "lerobot"
    assert lerobot.config == openpi.config, (lerobot.config, openpi.config)
    assert lerobot.config.num_diffusion_steps == STEPS and lerobot.config.chunk_size == CHUNK
    assert set(lerobot.weights) == set(openpi.weights)
    for name in openpi.weights:
        assert torch.equal(lerobot.weights[name], openpi.weights[name]), name
    obs = observation(model_type, 2, seed=400)
    a, b = run(openpi, obs), run(lerobot, obs)
    r, m = rel_diff(b, a)
    assert r <= 1e-6 and m <= 1e-6, (r, m)


# ---- batching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_predict_batch_equals_separate_predicts(engines, model_type):
    engine = engines(model_type, 2)
    items = [observation(model_type, 2, seed=500 + i) for i in range(3)]
    items[1]["prompt_tokens"] = items[1]["prompt_tokens"][:3]  # different prompt lengths per item
    items[2]["prompt_tokens"] = np.concatenate([items[2]["prompt_tokens"], [5, 6, 7, 8]])
    masks = [[True, True], [True, False], [False, True]]  # different valid views per item
    noise = np.stack([it["noise"] for it in items])
    batched = np.array(engine.predict_batch(
        [it["images"] for it in items],
        batch_states=[it.get("state") for it in items] if model_type == "pi0" else None,
        batch_prompt_tokens=[it["prompt_tokens"] for it in items],
        batch_image_masks=masks,
        noise=noise,
    ))
    assert batched.shape == (3, CHUNK, 8)
    for i, it in enumerate(items):
        single = run(engine, it, image_masks=masks[i])
        assert_same(batched[i], single, what=f"{model_type}: batch item {i}")
    # The items really are different (a batch that broadcast item 0 would fail here).
    assert_differs(batched[0], batched[1])
    assert_differs(batched[1], batched[2])
    # Swapping items in the batch swaps the outputs (no cross-item interaction, no position bookkeeping).
    order = [2, 0, 1]
    swapped = np.array(engine.predict_batch(
        [items[i]["images"] for i in order],
        batch_states=[items[i].get("state") for i in order] if model_type == "pi0" else None,
        batch_prompt_tokens=[items[i]["prompt_tokens"] for i in order],
        batch_image_masks=[masks[i] for i in order],
        noise=noise[order],
    ))
    assert_same(swapped, batched[order], what="permuted batch")


# ---- determinism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_noise_determines_the_result(engines, model_type):
    engine = engines(model_type, 2)
    obs = observation(model_type, 2, seed=600)
    first, second = run(engine, obs), run(engine, obs)
    np.testing.assert_array_equal(first, second)
    other_noise = np.random.default_rng(601).standard_normal(obs["noise"].shape).astype(np.float32)
    assert_differs(run(engine, obs, noise=other_noise), first, rel=1e-2, what="different noise")
    # Unseeded calls draw fresh noise.
    assert_differs(engine.predict(obs["images"], state=obs.get("state"), prompt_tokens=obs["prompt_tokens"]), first)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_returned_actions_survive_the_next_call(engines, model_type):
    """Regression: on CPU the engine once returned a numpy view of its static actions buffer."""
    engine = engines(model_type, 2)
    obs = observation(model_type, 2, seed=650)
    first = engine.predict(obs["images"], state=obs.get("state"), prompt_tokens=obs["prompt_tokens"], noise=obs["noise"])
    kept = np.array(first)
    other_noise = np.random.default_rng(651).standard_normal(obs["noise"].shape).astype(np.float32)
    second = engine.predict(obs["images"], state=obs.get("state"), prompt_tokens=obs["prompt_tokens"], noise=other_noise)
    np.testing.assert_array_equal(first, kept)
    assert_differs(second, first)
    batch = engine.predict_batch([obs["images"]] * 2, batch_states=[obs.get("state")] * 2 if model_type == "pi0" else None,
                                 batch_prompt_tokens=[obs["prompt_tokens"]] * 2, noise=np.stack([obs["noise"]] * 2))
    kept_batch = np.array(batch)
    engine.predict_batch([obs["images"]] * 2, batch_states=[obs.get("state")] * 2 if model_type == "pi0" else None,
                         batch_prompt_tokens=[obs["prompt_tokens"]] * 2, noise=np.stack([other_noise] * 2))
    np.testing.assert_array_equal(batch, kept_batch)


# ---- positions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_cls", [Pi0Model, Pi05Model])
def test_prefix_positions_skip_masked_views(model_cls):
    """The KV cache of [masked view 0][view 1][text] equals that of [view 1][text] on every valid token."""
    config = model_config_for(model_cls.model_type.value)
    model = model_cls(config)
    weights = random_weights(config, seed=9)
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(10)
    images = torch.rand(1, 2, 3, 224, 224, generator=generator) * 2 - 1
    token_ids = torch.randint(4, config.vocab_size, (1, MAX_LEN), generator=generator)
    token_mask = torch.zeros(1, MAX_LEN, dtype=torch.bool)
    token_mask[0, :PROMPT_LEN] = True
    with torch.no_grad():
        image_tokens = model.vision_encoder(ops, weights, {"images": images})  # (1, 512, D)
        per_view = config.num_patches
        two = model.transformer_encoder(ops, weights, {
            "image_tokens": image_tokens,
            "image_masks": torch.tensor([[False, True]]),
            "token_ids": token_ids,
            "token_mask": token_mask,
        })
        one = model.transformer_encoder(ops, weights, {
            "image_tokens": image_tokens[:, per_view:],
            "image_masks": torch.tensor([[True]]),
            "token_ids": token_ids,
            "token_mask": token_mask,
        })
    valid_two, valid_one = two["prefix_mask"][0], one["prefix_mask"][0]
    assert int(valid_two.sum()) == int(valid_one.sum()) == per_view + PROMPT_LEN
    assert len(two["kv_cache"]) == len(one["kv_cache"]) == config.num_encoder_layers
    for layer, ((k2, v2), (k1, v1)) in enumerate(zip(two["kv_cache"], one["kv_cache"])):
        assert k2.shape == (1, 2 * per_view + MAX_LEN, config.num_kv_heads, config.head_dim)
        assert_same(k2[0, valid_two].numpy(), k1[0, valid_one].numpy(), what=f"layer {layer} K")
        assert_same(v2[0, valid_two].numpy(), v1[0, valid_one].numpy(), what=f"layer {layer} V")

    # Direct: layer-0 K of the valid tokens is RoPE'd at 0, 1, 2, ... (not at 256, 257, ...).
    x, valid = model.embed_prefix(ops, weights, {
        "image_tokens": image_tokens, "image_masks": torch.tensor([[False, True]]),
        "token_ids": token_ids, "token_mask": token_mask,
    })
    h = ops.rms_norm(x, weights["llm.layers.0.attn_norm"], config.rms_norm_eps)
    count = int(valid.sum())
    compact = torch.arange(count)[None]
    _, k_compact, _ = project_qkv(ops, weights, "llm.layers.0", h[:, valid[0]], compact, config)
    _, k_naive, _ = project_qkv(ops, weights, "llm.layers.0", h[:, valid[0]], compact + per_view, config)
    k_cache = two["kv_cache"][0][0][:, valid[0]]
    assert_same(k_cache.numpy(), k_compact.numpy(), what="layer-0 K at compact positions")
    assert_differs(k_cache.numpy(), k_naive.numpy(), rel=1e-2, what="layer-0 K at unskipped positions")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_suffix_positions_start_after_valid_prefix(engines, model_type, monkeypatch):
    """The suffix starts at P = number of valid prefix tokens (Pi0: state at P, actions P+1..; Pi0.5: P..)."""
    engine = engines(model_type, 2)
    seen = {}
    original = type(engine.model).velocity

    def spy(self, ops, weights, x_t, t, ctx):
        seen["positions"] = ctx["suffix_positions"].clone()
        seen["prefix_mask"] = ctx["prefix_mask"].clone()
        return original(self, ops, weights, x_t, t, ctx)

    monkeypatch.setattr(type(engine.model), "velocity", spy)
    obs = observation(model_type, 2, seed=700)
    run(engine, obs, image_masks=[False, True])
    valid = 256 + PROMPT_LEN
    assert int(seen["prefix_mask"].sum()) == valid
    suffix = CHUNK + 1 if model_type == "pi0" else CHUNK
    np.testing.assert_array_equal(seen["positions"][0].numpy(), np.arange(valid, valid + suffix))

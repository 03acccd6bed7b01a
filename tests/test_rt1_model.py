"""RT-1's pieces against direct formulas (``docs/reference_facts.md#S-RT1``): the stride-2 padding quirk,
the input normalisation and batch norm, the TokenLearner softmax axis, the causal mask over the 114-token
sequence, action de-tokenisation, and the single-pass logits against a per-step recompute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.errors import ConfigError
from cortexflow.random_rt1 import random_rt1_weights, tiny_rt1_config
from cortexflow.models.efficientnet_film import conv_padding, efficientnet_blocks, normalize_input
from cortexflow.models.rt1 import (
    RT1_ACTIONS,
    RT1Config,
    RT1Model,
    action_logit_rows,
    detokenize_actions,
    rt1_attention_mask,
    token_learner,
    tokenize_actions,
)

OPS = PyTorchBackend(torch.device("cpu"), torch.float32)


def test_b3_blocks_and_parameter_count():
    """26 MBConv blocks; the TF checkpoint's 35,339,430 parameters less the unused 131,584 of
    ``_action_token_emb``."""
    model = RT1Model(RT1Config())
    assert len(model.blocks) == 26
    widths = [b.filters_out for b in model.blocks]
    assert [(w, widths.count(w)) for w in dict.fromkeys(widths)] == [(24, 2), (32, 3), (48, 3), (96, 5), (136, 5),
                                                                      (232, 6), (384, 2)]
    assert sum(math.prod(s) for s in model.get_weight_shapes().values()) == 35_339_430 - 131_584


def _size_after(size: int, mode: str) -> list[int]:
    sizes = []
    for kernel, stride in [(3, 2)] + [(b.kernel, b.stride) for b in efficientnet_blocks(1.2, 1.4)]:
        top, bottom, _, _ = conv_padding((size, size), kernel, stride, mode)
        size = (size + top + bottom - kernel) // stride + 1
        if stride == 2:
            sizes.append(size)
    return sizes


def test_stride2_padding_quirk_gives_9x9():
    assert conv_padding((75, 75), 3, 2, "keras") == (0, 1, 0, 1)
    assert conv_padding((75, 75), 5, 2, "keras") == (1, 2, 1, 2)
    assert conv_padding((75, 75), 5, 1, "keras") == (2, 2, 2, 2)
    assert _size_after(300, "keras") == [150, 75, 37, 18, 9]
    assert _size_after(300, "same")[-1] == 10  # Flax SAME (RT-1-X JAX): the 10x10 map


@pytest.mark.parametrize("kernel", [3, 5])
def test_stride2_conv_matches_direct_sum(kernel):
    """``ops.conv2d`` with the Keras stride-2 pads against the convolution sum written out."""
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(1, 2, 9, 9, generator=g)
    w = torch.randn(3, 2, kernel, kernel, generator=g)
    top, bottom, left, right = conv_padding((9, 9), kernel, 2, "keras")
    out = OPS.conv2d(x, w, None, 2, (top, bottom, left, right))
    padded = torch.zeros(1, 2, 9 + top + bottom, 9 + left + right)
    padded[:, :, top:top + 9, left:left + 9] = x
    size = (9 + top + bottom - kernel) // 2 + 1
    assert out.shape == (1, 3, size, size)
    for i in range(size):
        for j in range(size):
            patch = padded[0, :, 2 * i:2 * i + kernel, 2 * j:2 * j + kernel]
            expected = (patch[None] * w).sum(dim=(1, 2, 3))
            torch.testing.assert_close(out[0, :, i, j], expected, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_is_per_channel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 6, 6, generator=g)
    w = torch.randn(4, 1, 3, 3, generator=g)
    out = OPS.conv2d(x, w, None, 1, (1, 1, 1, 1), groups=4)
    for c in range(4):
        single = OPS.conv2d(x[:, c:c + 1], w[c:c + 1], None, 1, (1, 1, 1, 1))
        torch.testing.assert_close(out[:, c:c + 1], single)


def test_input_normalisation_and_batch_norm_formulas():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 5, 5, generator=g) * 255
    mean, variance = torch.rand(3, generator=g), torch.rand(3, generator=g) + 0.01
    rescale = 1.0 / torch.sqrt(torch.tensor([0.229, 0.224, 0.225]))
    got = normalize_input({"t.norm.mean": mean, "t.norm.variance": variance}, "t", images, rescale, torch.float32)
    c = (slice(None), slice(None), None, None)
    expected = (images / 255 - mean[c[1:]]) / torch.sqrt(variance)[c[1:]] * rescale[c[1:]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    x = torch.randn(2, 4, 3, 3, generator=g)
    m, v, gamma, beta = (torch.randn(4, generator=g) for _ in range(4))
    v = v.abs()
    got = OPS.batch_norm(x, m, v, gamma, beta, 1e-3)
    expected = (x - m[:, None, None]) / torch.sqrt(v[:, None, None] + 1e-3) * gamma[:, None, None] + beta[:, None, None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_token_learner_softmax_over_positions_of_unnormalised_tokens():
    g = torch.Generator().manual_seed(3)
    p, e, n, hidden = 81, 16, 8, 6
    w = {"tl.norm.weight": torch.randn(e, generator=g), "tl.norm.bias": torch.randn(e, generator=g),
         "tl.hidden.weight": torch.randn(hidden, e, generator=g), "tl.hidden.bias": torch.randn(hidden, generator=g),
         "tl.output.weight": torch.randn(n, hidden, generator=g), "tl.output.bias": torch.randn(n, generator=g)}
    tokens = torch.randn(2, p, e, generator=g) * 3 + 1
    got = token_learner(OPS, w, "tl", tokens, 1e-6)
    x = tokens.double()
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    normed = normed * w["tl.norm.weight"].double() + w["tl.norm.bias"].double()
    h = normed @ w["tl.hidden.weight"].double().T + w["tl.hidden.bias"].double()
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    scores = h @ w["tl.output.weight"].double().T + w["tl.output.bias"].double()  # (B, P, N)
    weights = torch.exp(scores - scores.amax(dim=1, keepdim=True))
    weights = weights / weights.sum(dim=1, keepdim=True)  # normalised over the P positions
    expected = torch.einsum("bpn,bpe->bne", weights, x)
    assert got.shape == (2, n, e)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_causal_mask_over_114_tokens():
    mask = rt1_attention_mask(6, 8, 11).numpy()
    assert mask.shape == (114, 114)
    expected = np.tril(np.ones((114, 114), dtype=bool))
    for i in range(114):
        for j in range(114):
            si, sj, ai, aj = i // 19, j // 19, i % 19 >= 8, j % 19 >= 8
            if ai and aj and (sj < si or (sj == si and j <= i)):
                expected[i, j] = False
    np.testing.assert_array_equal(mask, expected)
    action_row = 19 * 2 + 8 + 3  # action slot 3 of step 2
    assert mask[action_row, :19 * 3].sum() == 24  # the 8 image tokens of steps 0, 1, 2 only
    image_row = 19 * 2 + 5
    assert mask[image_row, 19 + 8:19 + 19].all()  # image tokens see earlier (zero) action slots
    rt1x = rt1_attention_mask(6, 8, 11, image_sees_actions=False).numpy()
    image_to_action = (np.arange(114) % 19 < 8)[:, None] & (np.arange(114) % 19 >= 8)[None]
    np.testing.assert_array_equal(rt1x, expected & ~image_to_action)


def test_action_logit_rows():
    rows = action_logit_rows(torch.tensor([0, 5]), 8, 11)
    np.testing.assert_array_equal(rows[0].numpy(), np.arange(7, 18))
    np.testing.assert_array_equal(rows[1].numpy(), 8 + 19 * 5 - 1 + np.arange(11))


def test_action_detokenisation_formula():
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 256, size=(5, 11))
    tokens[0, 0], tokens[1, 0] = 3, 255  # out-of-range terminate classes -> class 0
    actions = detokenize_actions(tokens, RT1_ACTIONS, 256)
    for b in range(5):
        cls = tokens[b, 0] if tokens[b, 0] < 3 else 0
        np.testing.assert_array_equal(actions["terminate_episode"][b], np.eye(3, dtype=np.int32)[cls])
        np.testing.assert_allclose(actions["world_vector"][b], tokens[b, 1:4] / 255 * 2 - 1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(actions["rotation_delta"][b], tokens[b, 4:7] / 255 * math.pi - math.pi / 2,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(actions["gripper_closedness_action"][b], tokens[b, 7:8] / 255 * 2 - 1, atol=1e-6)
        np.testing.assert_allclose(actions["base_displacement_vertical_rotation"][b],
                                   tokens[b, 8:9] / 255 * 2 * math.pi - math.pi, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(actions["base_displacement_vector"][b], tokens[b, 9:11] / 255 * 2 - 1, atol=1e-6)
    assert actions["world_vector"].dtype == np.float32
    valid = tokens.copy()
    valid[:, 0] = np.minimum(valid[:, 0], 2)
    np.testing.assert_array_equal(tokenize_actions(detokenize_actions(valid, RT1_ACTIONS, 256), RT1_ACTIONS, 256)[:, 0],
                                  valid[:, 0])


def _decoder_recompute(model, weights, frame_tokens: list[torch.Tensor]) -> torch.Tensor:
    """Reference loop of ``docs/reference_facts.md#F-RT1-4`` for one episode: window of the last T frames, one transformer pass."""
    c = model.config
    t = min(len(frame_tokens), c.time_steps) - 1
    window = frame_tokens[-c.time_steps:]
    history = torch.zeros(1, c.time_steps, c.num_tokens, c.embedding_dim)
    for i, tok in enumerate(window):
        history[0, i] = tok
    return model.transformer_decoder(OPS, weights, {"history": history, "slot": torch.tensor([t])})


RT1X_STYLE = dict(ffn="swiglu", padding="same", image_sees_actions=False, vocab_size=512)


@pytest.mark.parametrize("config", [tiny_rt1_config(), tiny_rt1_config(**RT1X_STYLE)], ids=["rt1", "rt1x-style"])
def test_step_with_history_matches_recompute(config):
    """``forward`` (token reuse + in-place history) equals recomputing each step from all frames, across
    the window filling up and rolling; the image and the instruction both change the logits."""
    model = RT1Model(config)
    weights = random_rt1_weights(model, 5)
    g = torch.Generator().manual_seed(6)
    shapes = model.get_buffer_shapes()
    buffers = {k: torch.zeros(s, dtype=model.buffer_dtype(k, torch.float32)) for k, s in shapes.items()}
    context = torch.randn(1, config.context_dim, generator=g)
    buffers["context"].copy_(context)
    seen = []
    for _ in range(config.time_steps + 2):
        frame = torch.rand(1, 3, *config.input_size, generator=g)
        buffers["images"].copy_(frame)
        seen.append(model.vision_encoder(OPS, weights, {"images": frame, "context": context})[0])
        model.forward(OPS, weights, buffers)
        expected = _decoder_recompute(model, weights, seen)
        torch.testing.assert_close(buffers["logits"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(buffers["tokens"].numpy(), expected.argmax(-1).numpy())
    other = model.vision_encoder(OPS, weights, {"images": torch.rand(1, 3, *config.input_size, generator=g),
                                                "context": context})
    assert (other[0] - seen[-1]).abs().max() > 1e-3
    recontext = model.vision_encoder(OPS, weights, {"images": buffers["images"], "context": -context})
    assert (recontext[0] - seen[-1]).abs().max() > 1e-3


def test_rt1x_config_dimensions():
    config = RT1Config.rt1x_jax()
    assert config.sequence_length == 15 * 92 == 1380
    assert config.num_heads * config.head_dim == 2048
    assert dict((f.name, (f.low, f.high)) for f in config.actions)["world_vector"] == (-2.0, 2.0)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="ffn"):
        RT1Model(tiny_rt1_config(ffn="gelu"))
    with pytest.raises(ConfigError, match="unknown RT-1 config fields"):
        tiny_rt1_config().replace(layers=3)


class _SwishGateBackend(PyTorchBackend):
    """A faulty backend: squeeze-excite gates through swish instead of sigmoid."""

    name = "faulty"

    def sigmoid(self, x):
        return torch.nn.functional.silu(x)


def test_verify_rt1_passes_the_reference_and_catches_a_faulty_op():
    from cortexflow.tools.history_verify import run_rt1_verify

    report = run_rt1_verify(device="cpu", size="tiny", repeats=1)
    assert report["passed"]
    assert [row["name"] for row in report["modules"]] == ["tokenizer", "token_learner", "decoder_layer0", "logits",
                                                          "actions"]
    faulty = run_rt1_verify(_SwishGateBackend, device="cpu", size="tiny", repeats=1)
    assert not faulty["passed"]
    assert faulty["modules"][0]["status"] == "over"


def test_bench_grid_times_rt1_steps():
    from cortexflow.tools.bench import run_bench

    results = run_bench(models=("rt1",), device="cpu", size="tiny", iters=2, warmup=0)
    (row,) = results["runs"]
    assert (row["model"], row["views"], row["steps"], row["cuda_graphs"]) == ("rt1", 1, None, False)
    assert row["median_ms"] > 0 and row["iters"] == 2 and row["prefix_tokens"] == 3 * (3 + 11)
    assert not results["failed"] and "rt1" in results["notes"][0]

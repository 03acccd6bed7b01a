"""Engine input/output paths: legacy LeRobot keys, string prompts with a tokenizer, norm stats, progress bar."""

import json

import numpy as np
import pytest
import torch

import cortexflow as cf
from cortexflow.checkpoints.pi0_layout import PALIGEMMA, PALIGEMMA_MODEL, LANGUAGE
from cortexflow.processing import load_norm_stats, normalize, unnormalize
from cortexflow.random_checkpoint import random_weights, tiny_model_config, write_checkpoint


def _inputs(seed, state_dim=6, chunk=5, action_dim=8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2, 64, 96, 3), dtype=np.uint8)
    state = rng.standard_normal(state_dim).astype(np.float32)
    noise = rng.standard_normal((chunk, action_dim)).astype(np.float32)
    return images, state, noise


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _write_norm_stats(path, state_dim=6, action_dim=7, seed=0):
    rng = np.random.default_rng(seed)

    def stats(dim):
        q01 = rng.uniform(-2, -0.5, dim)
        return {"mean": rng.normal(size=dim).tolist(), "std": rng.uniform(0.5, 2, dim).tolist(),
                "q01": q01.tolist(), "q99": (q01 + rng.uniform(1, 3, dim)).tolist()}

    path.write_text(json.dumps({"norm_stats": {"state": stats(state_dim), "actions": stats(action_dim)}}))
    return path


def test_legacy_lerobot_layout_loads_to_the_same_actions(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_model_config("pi0")
    write_checkpoint(tmp_path / "new", config, layout="lerobot")
    state = load_file(str(tmp_path / "new" / "model.safetensors"))
    legacy = {}
    for key, tensor in state.items():
        key = key.replace("model." + LANGUAGE, "model." + PALIGEMMA + "language_model.model.")
        key = key.replace("model." + PALIGEMMA_MODEL, "model." + PALIGEMMA)
        legacy[key] = tensor
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "model.safetensors"))
    (tmp_path / "legacy" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    assert cf.checkpoints.inspect_checkpoint(tmp_path / "legacy", config).layout == "lerobot-legacy"
    images, robot_state, noise = _inputs(1)
    outputs = []
    for folder in ("new", "legacy"):
        engine = cf.create_pi0_inference(tmp_path / folder, device="cpu", dtype="float32", model_config=config)
        outputs.append(engine.predict(images, state=robot_state, prompt_tokens=[2, 9, 33], noise=noise))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_string_prompt_and_norm_stats(tmp_path, tiny_tokenizer_path, model_type):
    config = tiny_model_config(model_type)
    write_checkpoint(tmp_path / "ckpt", config, weights=random_weights(config, seed=5))
    stats_path = _write_norm_stats(tmp_path / "norm_stats.json")
    create = cf.create_pi0_inference if model_type == "pi0" else cf.create_pi05_inference
    common = dict(device="cpu", dtype="float32", model_config=config, tokenizer_path=tiny_tokenizer_path)
    with_stats = create(tmp_path / "ckpt", norm_stats_path=stats_path, **common)
    raw = create(tmp_path / "ckpt", **common)
    images, state, noise = _inputs(2)
    stats = load_norm_stats(stats_path)
    mode = "zscore" if model_type == "pi0" else "quantile"

    actions = with_stats.predict(images, "pick up the red cube", state, noise=noise)
    # The same call on an engine without stats, fed the normalised state, gives the normalised actions.
    normalized = raw.predict(images, "pick up the red cube", normalize(state, stats["state"], mode), noise=noise)
    np.testing.assert_allclose(actions, unnormalize(normalized, stats["actions"], mode), rtol=1e-5, atol=1e-5)
    assert _rel(actions, normalized) > 1e-3  # un-normalisation really happened
    np.testing.assert_array_equal(actions[:, 7:], normalized[:, 7:])  # dims past the robot's pass through

    other_prompt = with_stats.predict(images, "open the drawer", state, noise=noise)
    assert _rel(other_prompt, actions) > 1e-4
    other_state = with_stats.predict(images, "pick up the red cube", state + 0.5, noise=noise)
    assert _rel(other_state, actions) > 1e-4  # Pi0: state token; Pi0.5: state bins in the prompt


def test_pi05_without_discrete_state_ignores_state(tmp_path, tiny_tokenizer_path):
    config = tiny_model_config("pi05")
    write_checkpoint(tmp_path, config)
    engine = cf.create_pi05_inference(tmp_path, device="cpu", dtype="float32", model_config=config,
                                      tokenizer_path=tiny_tokenizer_path, discrete_state_input=False)
    images, state, noise = _inputs(3)
    first = engine.predict(images, "wipe the table", state, noise=noise)
    np.testing.assert_array_equal(first, engine.predict(images, "wipe the table", state + 1, noise=noise))


def test_progress_bar_is_shown_when_asked(tmp_path, capsys):
    config = tiny_model_config("pi0")
    write_checkpoint(tmp_path, config)
    cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config, progress=True)
    assert "loading" in capsys.readouterr().err
    cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config, progress=False)
    assert "loading" not in capsys.readouterr().err


def test_images_are_prepared_in_the_staging_buffer_and_calls_leave_nothing_behind(tmp_path, monkeypatch):
    """The built-in preprocessor writes the images straight into the engine's staged buffer (no image-sized
    allocation per call); a call with other inputs in between, or a batch, changes nothing."""
    import cortexflow.preprocessor
    from cortexflow.processing import prepare_images

    targets = []

    def spy(images, num_views, image_size, out=None):
        targets.append(None if out is None else out.ctypes.data)
        return prepare_images(images, num_views, image_size, out=out)

    monkeypatch.setattr(cortexflow.preprocessor, "prepare_images", spy)
    config = tiny_model_config("pi0", chunk_size=5)
    write_checkpoint(tmp_path, config)
    engine = cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config)
    images, state, noise = _inputs(2)
    first = engine.predict(images, state=state, prompt_tokens=[2, 9], noise=noise)
    staged = engine.staging(1)["images"]
    assert targets == [staged.data_ptr()]
    np.testing.assert_array_equal(staged[0].numpy(), prepare_images(images, 2, config.image_size).numpy())
    other, other_state, _ = _inputs(3)
    engine.predict(other, state=other_state, prompt_tokens=[2, 9, 4, 5], noise=noise)
    np.testing.assert_array_equal(engine.predict(images, state=state, prompt_tokens=[2, 9], noise=noise), first)
    batch = engine.predict_batch([other, images], batch_states=[other_state, state],
                                 batch_prompt_tokens=[[2, 9, 4, 5], [2, 9]], noise=np.stack([noise, noise]))
    np.testing.assert_array_equal(engine.staging(2)["images"][1].numpy(), staged[0].numpy())
    np.testing.assert_allclose(batch[1], first, rtol=1e-5, atol=1e-6)


def test_prompt_bucket_settings_are_checked():
    from cortexflow.config import prompt_bucket_lengths

    assert prompt_bucket_lengths(cf.InferenceConfig(device="cpu").prompt_buckets, 48) == (32, 48)
    assert prompt_bucket_lengths("auto", 200) == (32, 64, 128, 200)
    assert prompt_bucket_lengths(cf.InferenceConfig(device="cpu", prompt_buckets="off").prompt_buckets, 200) == (200,)
    assert prompt_bucket_lengths(cf.InferenceConfig(device="cpu", prompt_buckets="64, 16").prompt_buckets, 200) == (16, 64, 200)
    assert prompt_bucket_lengths(cf.InferenceConfig(device="cpu", prompt_buckets=[48, 8]).prompt_buckets, 48) == (8, 48)
    for bad in ("sometimes", [0, 16], [], ["x"], 5):
        with pytest.raises(cf.ConfigError, match="prompt_buckets"):
            cf.InferenceConfig(device="cpu", prompt_buckets=bad)
    with pytest.raises(cf.ConfigError, match=r"prompt_buckets \[64\] exceed the model's max_token_len 48"):
        prompt_bucket_lengths((16, 64), 48)


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_prompt_buckets_change_the_work_not_the_actions(tmp_path, model_type):
    """A prompt padded to a shorter bucket gives the actions of openpi's full-length padding (the padded
    tokens are masked keys either way); a batch takes the bucket of its longest prompt; warmup() runs
    every bucket once."""
    config = tiny_model_config(model_type, chunk_size=5)
    write_checkpoint(tmp_path, config)
    create = cf.create_pi0_inference if model_type == "pi0" else cf.create_pi05_inference
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, size=(2, 64, 96, 3), dtype=np.uint8) for _ in range(2)]
    states = [rng.standard_normal(6).astype(np.float32) for _ in range(2)]
    noise = rng.standard_normal((2, 5, 8)).astype(np.float32)
    prompts = [[2, 9, 33], [2] + rng.integers(3, 300, 11).tolist()]
    results = {}
    for buckets in ("off", "auto", (8, 16)):
        engine = create(tmp_path, device="cpu", dtype="float32", model_config=config, prompt_buckets=buckets)
        single = engine.predict(images[0], state=states[0], prompt_tokens=prompts[0], noise=noise[0])
        batch = engine.predict_batch(images, batch_states=states, batch_prompt_tokens=prompts, noise=noise)
        results[buckets] = (single, batch)
        if buckets == (8, 16):
            assert engine.prompt_buckets == (8, 16, config.max_token_len)
            assert engine.buffers(1, 8)["token_ids"].shape == (1, 8)
            assert engine.buffers(2, 16)["token_mask"][1].sum() == 12 and engine.buffers(2, 16)["token_mask"][0].sum() == 3
            assert engine.buffers(1, 8)["images"] is engine.buffers(1)["images"]
            with pytest.raises(ValueError, match="not one of this engine's buckets"):
                engine.buffers(1, 12)
            assert engine.warmup(batch_sizes=(1, 2)) == [(1, 8), (1, 16), (1, config.max_token_len),
                                                         (2, 8), (2, 16), (2, config.max_token_len)]
    for buckets in ("auto", (8, 16)):
        for got, want in zip(results[buckets], results["off"]):
            assert _rel(got, want) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and page-locked staging need a CUDA GPU")
def test_graphs_of_several_buckets_share_one_pool_and_match_eager(tmp_path):
    """On a GPU: one CUDA graph per (batch, prompt bucket), all in one memory pool, replayed in any order,
    give the un-graphed engine's actions (inputs staged in page-locked memory, copied asynchronously)."""
    config = tiny_model_config("pi0", chunk_size=5)
    write_checkpoint(tmp_path, config)
    engines = {graphs: cf.create_pi0_inference(tmp_path, device="cuda", dtype="float32", model_config=config,
                                               use_cuda_graphs=graphs, prompt_buckets=(8, 16)) for graphs in (False, True)}
    rng = np.random.default_rng(11)
    calls = []
    for length in (3, 12, 40, 3, 12):  # buckets 8, 16, 48, then the first two graphs again
        images, state, noise = _inputs(int(rng.integers(1000)))
        calls.append(dict(observation_images=images, state=state, noise=noise,
                          prompt_tokens=[2] + rng.integers(3, 300, length - 1).tolist()))
    got = [engines[True].predict(**call) for call in calls]
    assert sorted(engines[True]._graphs) == [(1, 8), (1, 16), (1, 48)]
    assert engines[True].staging(1)["images"].is_pinned()
    for call, actions in zip(calls, got):
        assert _rel(actions, engines[False].predict(**call)) < 1e-5
    assert _rel(got[3], got[0]) > 1e-3  # different inputs really gave different actions
    # the images prepared on the GPU (the default there) or on the host: the same inputs at the target size
    host = cf.create_pi0_inference(tmp_path, device="cuda", dtype="float32", model_config=config,
                                   image_preprocessing="host")
    square = dict(calls[0], observation_images=rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8))
    assert _rel(host.predict(**square), engines[True].predict(**square)) < 1e-5
    np.testing.assert_array_equal(host.buffers(1)["images"].cpu().numpy(), engines[True].buffers(1)["images"].cpu().numpy())


# ---- token_embedding: the text embedding table in host memory ----------------------------------------
@pytest.mark.parametrize("model_type,dtype", [("pi0", "float32"), ("pi0", "bfloat16"), ("pi05", "bfloat16")])
def test_host_token_embedding_gives_the_device_lookups_bits(tmp_path, model_type, dtype):
    """token_embedding="host": the table leaves the device's weights, each call gathers the prompt's scaled rows
    on the CPU into a (B, L, D) buffer in place of the ids, and the actions are the device lookup's, bit for bit,
    at every prompt bucket and in a batch."""
    config = tiny_model_config(model_type, chunk_size=5)
    write_checkpoint(tmp_path, config)
    create = cf.create_pi0_inference if model_type == "pi0" else cf.create_pi05_inference
    engines = {where: create(tmp_path, device="cpu", dtype=dtype, model_config=config, prompt_buckets=(8, 16),
                             token_embedding=where) for where in ("device", "host", "auto")}
    host = engines["host"]
    assert engines["auto"].host_embedding is None  # auto: the device's own lookup on a CPU
    assert "llm.embed" in engines["device"].weights and "llm.embed" not in host.weights
    table = engines["device"].weights["llm.embed"]
    assert host.host_table.device.type == "cpu" and host.host_table.dtype == cf.config.parse_dtype(dtype)
    normalizer = torch.tensor(config.encoder_dim**0.5, dtype=table.dtype).item()
    assert torch.equal(host.host_table, (table * normalizer).to(host.host_table.dtype))
    table_bytes = table.numel() * table.element_size()
    assert host.weight_bytes()["host"] == table_bytes and engines["device"].weight_bytes()["host"] == 0
    assert engines["device"].weight_bytes()["device"] - host.weight_bytes()["device"] == table_bytes
    rng = np.random.default_rng(3)
    prompts = [[2] + rng.integers(3, config.vocab_size, n - 1).tolist() for n in (3, 12, 40)]
    for tokens in prompts:
        images, state, noise = _inputs(int(rng.integers(1000)))
        got = host.predict(images, state=state, prompt_tokens=tokens, noise=noise)
        np.testing.assert_array_equal(got, engines["device"].predict(images, state=state, prompt_tokens=tokens, noise=noise))
    full = config.max_token_len
    buffers = host.buffers(1, full)
    assert "token_ids" not in buffers and buffers["token_embeddings"].shape == (1, full, config.encoder_dim)
    ids = torch.as_tensor(prompts[2] + [0] * (full - len(prompts[2])))
    assert torch.equal(buffers["token_embeddings"][0], host.host_table[ids])  # the last call's rows, padding included
    assert host.buffers(1, 8)["token_embeddings"].shape == (1, 8, config.encoder_dim)
    images = [_inputs(s)[0] for s in (5, 6)]
    states = [_inputs(s)[1] for s in (5, 6)]
    noise = np.stack([_inputs(s)[2] for s in (5, 6)])
    batch = {where: engines[where].predict_batch(images, batch_states=states, batch_prompt_tokens=prompts[:2], noise=noise)
             for where in ("device", "host")}
    np.testing.assert_array_equal(batch["host"], batch["device"])
    assert _rel(batch["host"][0], batch["host"][1]) > 1e-3  # different samples really differ
    guided = {where: engines[where].predict(images[0], state=states[0], prompt_tokens=prompts[0], noise=noise[0],
                                            prev_actions=batch["device"][1][:4], inference_delay=2)
              for where in ("device", "host")}  # real-time chunking: the eager, guided forward
    np.testing.assert_array_equal(guided["host"], guided["device"])


def test_token_embedding_setting_is_checked(tmp_path):
    from cortexflow.models.pi0 import Pi0Model

    with pytest.raises(cf.ConfigError, match="token_embedding must be 'auto', 'device' or 'host', got 'gpu'"):
        cf.InferenceConfig(device="cpu", token_embedding="gpu")
    config = tiny_model_config("pi0", chunk_size=5)
    write_checkpoint(tmp_path, config)
    with pytest.raises(cf.ConfigError, match="token_embedding='host' needs a backend that runs the model's own stages; "
                                              "the onnx backend looks the token ids up itself"):
        cf.create_pi0_inference(tmp_path, backend="onnx", device="cpu", dtype="float32", model_config=config,
                                token_embedding="host")

    class NoHostTable(Pi0Model):
        host_embedding = None

    weights = random_weights(config, seed=0)
    inference = cf.InferenceConfig(device="cpu", dtype="float32", token_embedding="host")
    with pytest.raises(cf.ConfigError, match="NoHostTable has no lookup table to keep in host memory"):
        cf.VLAInferenceEngine(weights, inference_config=inference, model=NoHostTable(config))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the table's GPU memory and CUDA graphs need a CUDA GPU")
def test_host_token_embedding_frees_the_tables_gpu_memory_and_matches_in_a_graph(tmp_path):
    """On a GPU the default ("auto") keeps the table in host memory: the engine's GPU weights are the table's bytes
    fewer, and its graphed calls give the device lookup's actions bit for bit."""
    config = tiny_model_config("pi0", chunk_size=5, vocab_size=4096)
    write_checkpoint(tmp_path, config)
    engines = {}
    for where in ("device", "auto"):
        before = torch.cuda.memory_allocated()
        engines[where] = cf.create_pi0_inference(tmp_path, device="cuda", dtype="bfloat16", model_config=config,
                                                 token_embedding=where, prompt_buckets=(8, 16))
        engines[where].allocated = torch.cuda.memory_allocated() - before
    assert engines["auto"].host_embedding is not None and engines["auto"].host_table.device.type == "cpu"
    table_bytes = 4096 * config.encoder_dim * 2
    assert engines["device"].allocated - engines["auto"].allocated >= table_bytes
    rng = np.random.default_rng(4)
    for n in (3, 12, 3):
        images, state, noise = _inputs(int(rng.integers(1000)))
        tokens = [2] + rng.integers(3, 4096, n - 1).tolist()
        got = engines["auto"].predict(images, state=state, prompt_tokens=tokens, noise=noise)
        np.testing.assert_array_equal(got, engines["device"].predict(images, state=state, prompt_tokens=tokens, noise=noise))
    assert engines["auto"].staging(1, 8)["token_embeddings"].is_pinned()


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_the_last_prefix_layers_unread_weights_are_neither_read_nor_loaded(tmp_path, model_type):
    """The prefix pass needs only its last layer's K/V: that layer's o-projection, MLP norm and MLP set to NaN leave
    the actions unchanged (so nothing reads them), and the engine neither loads nor keeps them."""
    from cortexflow.backends.pytorch import PyTorchBackend
    from cortexflow.models.pi0 import Pi0Model, Pi05Model
    from cortexflow.tools.verify import random_inputs

    config = tiny_model_config(model_type, chunk_size=5)
    model = (Pi0Model if model_type == "pi0" else Pi05Model)(config)
    last = config.num_encoder_layers - 1
    unread = model.unread_weights()
    assert sorted(unread) == sorted(f"llm.layers.{last}.{p}" for p in ("o", "mlp_norm", "gate", "up", "down"))
    weights = random_weights(config, seed=3)
    inputs = random_inputs(model, 2, 6, seed=4, device=torch.device("cpu"))
    backend = PyTorchBackend(torch.device("cpu"), torch.float32)
    want = model.forward(backend, weights, {n: t.clone() for n, t in inputs.items()}).clone()
    poisoned = {n: torch.full_like(t, float("nan")) if n in unread else t for n, t in weights.items()}
    got = model.forward(backend, poisoned, {n: t.clone() for n, t in inputs.items()})
    assert torch.isfinite(want).all() and torch.equal(got, want)
    poisoned[f"llm.layers.{last}.k"] = torch.full_like(weights[f"llm.layers.{last}.k"], float("nan"))
    assert torch.isnan(model.forward(backend, poisoned, {n: t.clone() for n, t in inputs.items()})).all()  # K is read

    write_checkpoint(tmp_path, config, weights=weights)
    create = cf.create_pi0_inference if model_type == "pi0" else cf.create_pi05_inference
    engine = create(tmp_path, device="cpu", dtype="float32", model_config=config)
    assert not set(unread) & set(engine.weights) and f"llm.layers.{last}.k" in engine.weights
    state = inputs.get("state", torch.zeros(1, config.action_dim))[0, :6].numpy()
    images, _, noise = _inputs(8)
    from cortexflow.models.pi0_keys import to_checkpoint_keys

    full = cf.VLAInferenceEngine(to_checkpoint_keys(weights, config), model=model,  # the in-memory state-dict path
                                 inference_config=cf.InferenceConfig(device="cpu", dtype="float32"))
    assert not set(unread) & set(full.weights)
    np.testing.assert_array_equal(engine.predict(images, state=state, prompt_tokens=[2, 7, 9], noise=noise),
                                  full.predict(images, state=state, prompt_tokens=[2, 7, 9], noise=noise))


def test_cpu_weights_are_copied_to_aligned_memory():
    """The PyTorch backend on the CPU copies weights whose data does not start on a 64-byte boundary (a safetensors
    file's 8-byte offsets), leaves aligned ones in place, and keeps every value."""
    from cortexflow.backends.pytorch import CPU_WEIGHT_ALIGNMENT, PyTorchBackend
    from cortexflow.ops import FusableWeights

    buffer = torch.randn(4 * 64 + 2, generator=torch.Generator().manual_seed(5))
    unaligned = buffer[2:].view(4, 64)
    aligned = torch.randn(3, 5)
    assert unaligned.data_ptr() % CPU_WEIGHT_ALIGNMENT and aligned.data_ptr() % CPU_WEIGHT_ALIGNMENT == 0
    weights = {"a.weight": unaligned, "b.weight": aligned}
    out = PyTorchBackend(torch.device("cpu"), torch.float32).fuse_weights(dict(weights), FusableWeights())
    assert out["a.weight"].data_ptr() % CPU_WEIGHT_ALIGNMENT == 0 and torch.equal(out["a.weight"], unaligned)
    assert out["b.weight"].data_ptr() == aligned.data_ptr()

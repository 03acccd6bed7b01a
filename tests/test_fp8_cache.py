"""The on-disk cache of a token VLA's FP8 language-model layers (``fp8_cache=`` of the OpenVLA / RT-2 factories).

Tiny random checkpoints in the real on-disk formats; FP8 engines on the CPU under the Triton interpreter (the
factories refuse the interpreter for ``precision="fp8"``, which the ``fp8_here`` fixture lifts), on the GPU where
there is one. Covered: a miss writes one entry, the next start hits it without reading the replaced bf16 tensors
and decodes the same tokens and actions bit for bit; the cached tensors are E4M3 with their scales and equal a
fresh quantisation; a changed checkpoint or changed FP8 settings miss; an interrupted or failed write leaves no
entry; a damaged entry is replaced; the streaming (GPU) preparation leaves cached layers as they are;
``fp8_cache`` without ``precision="fp8"`` is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import cortexflow as cf
from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.errors import ConfigError, CortexFlowWarning
from cortexflow.quantization import fp8 as fp8_module
from cortexflow.quantization.fp8 import E4M3, fp8_scale_key, quantize_weight
from cortexflow.random_token_vla import (
    example_norm_stats,
    tiny_openvla_config,
    tiny_rt2_config,
    write_openvla_checkpoint,
    write_rt2_checkpoint,
)

pytest.importorskip("triton")

from cortexflow.backends.triton_backend import TritonBackend  # noqa: E402
from cortexflow.backends.triton_options import TritonOptions  # noqa: E402
from cortexflow.quantization.fp8_cache import MANIFEST, TENSORS, fp8_layer_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: The smallest token VLAs the interpreter decodes in about a second: 28 px images (4 patches a tower), 2 action
#: tokens, prompts padded to 4 ids.
OPENVLA = dict(image_size=28, num_heads=2, num_kv_heads=2, head_dim=32)
OPENVLA_IDS = {"space_token_id": 259, "bos_id": 1}
RT2 = tiny_rt2_config(action_dim=2, chunk_size=1, image_size=28)


@pytest.fixture(autouse=True)
def fp8_here(monkeypatch):
    """Let ``precision="fp8"`` run here: on the CPU under the interpreter, or on a GPU of compute capability 8.9+."""
    if torch.cuda.is_available():
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("FP8 needs a GPU of compute capability 8.9 or later")
        return
    monkeypatch.setattr(fp8_module, "fp8_unsupported_reason", lambda device, allow_interpreter=False: None)


def write_checkpoint(model: str, directory: Path, seed: int) -> Path:
    if model == "openvla":
        return write_openvla_checkpoint(directory, tiny_openvla_config(**OPENVLA), seed=seed, dtype=torch.bfloat16,
                                        norm_stats=example_norm_stats(2))
    return write_rt2_checkpoint(directory, RT2, seed=seed, dtype=torch.bfloat16)


def create(model: str, checkpoint: Path, backend="triton", **options):
    if model == "openvla":
        return cf.create_openvla_inference(checkpoint, backend=backend, device=DEVICE, dtype="bfloat16",
                                           precision="fp8", bucket=4, model_config=OPENVLA_IDS, **options)
    return cf.create_rt2_inference(checkpoint, backend=backend, device=DEVICE, dtype="bfloat16", precision="fp8",
                                   bucket=4, model_config=RT2, constrained_decoding=False, **options)


def header_model(model: str, checkpoint: Path):
    """The model the factory keys the cache with: built from the checkpoint's headers, before the engine adapts
    its config (OpenVLA's action width from the statistics)."""
    if model == "openvla":
        from cortexflow.checkpoints.openvla_layout import inspect_openvla_checkpoint
        from cortexflow.models.openvla import OpenVLAModel

        return OpenVLAModel(inspect_openvla_checkpoint(checkpoint, OPENVLA_IDS).config)
    from cortexflow.checkpoints.rt2_layout import open_rt2_checkpoint

    return open_rt2_checkpoint(checkpoint, RT2)[0]


def entry_of(model: str, checkpoint: Path, cache: Path, options: TritonOptions = TritonOptions(fp8="decoder"),
             dtype: torch.dtype = torch.bfloat16):
    """The cache entry an FP8 engine of ``checkpoint`` with ``options`` reads or writes under ``cache``."""
    return fp8_layer_cache(cache, checkpoint, header_model(model, checkpoint), options, dtype)


def entries(cache: Path) -> list[Path]:
    """Every folder under ``cache``, hidden staging folders included."""
    return sorted(p for p in cache.iterdir()) if cache.exists() else []


def raw_sources(model: str, engine, checkpoint: Path) -> dict[str, str]:
    """Canonical weight name -> the checkpoint's tensor name, for ``engine``'s model."""
    if model == "rt2":
        return dict(engine.checkpoint_report.sources)
    from cortexflow.checkpoints.openvla_layout import inspect_openvla_checkpoint, match_openvla_keys

    config = inspect_openvla_checkpoint(checkpoint, OPENVLA_IDS).config
    return dict(match_openvla_keys(CheckpointFiles.open(checkpoint).tensors, config).sources)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the checkpoint tensors read from disk (``CheckpointFiles.read``), in order."""
    names: list[str] = []
    original = CheckpointFiles.read

    def read(self, name):
        names.append(name)
        return original(self, name)

    monkeypatch.setattr(CheckpointFiles, "read", read)
    return names


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` (E4M3 compares bit for bit this way; NaN-free floats as values would too)."""
    return tensor.reshape(-1).view(torch.uint8)


def random_inputs(model: str, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    first = 1 if model == "openvla" else 2  # the tiny vocabularies' BOS
    return image, [first, *rng.integers(4, 250, 2).tolist()]


@pytest.mark.parametrize("model", ["openvla", "rt2"])
def test_a_miss_writes_one_entry_that_the_next_start_hits(model, tmp_path, reads, caplog):
    checkpoint, cache = write_checkpoint(model, tmp_path / "ckpt", seed=5), tmp_path / "fp8"
    with caplog.at_level(logging.INFO, logger="cortexflow.quantization.fp8_cache"):
        first = create(model, checkpoint, fp8_cache=cache)
    assert "FP8 cache miss" in caplog.text and "FP8 cache: wrote 2 layers" in caplog.text
    entry = entry_of(model, checkpoint, cache)
    assert entries(cache) == [entry.folder]
    assert sorted(p.name for p in entry.folder.iterdir()) == [TENSORS, MANIFEST]
    manifest = json.loads((entry.folder / MANIFEST).read_text())
    assert manifest["key"] == entry.folder.name and manifest["layers"] == ["llm.layers.0", "llm.layers.1"]
    assert manifest["checkpoint_hash"] == manifest["key_parts"]["checkpoint_hash"] == entry.key_parts["checkpoint_hash"]
    assert manifest["bytes"] > 0 and manifest["key_parts"]["fp8_stages"] == ["decoder"]
    sources = raw_sources(model, first, checkpoint)
    replaced = {sources[name] for name in entry.checkpoint_names}
    assert len(replaced) == 2 * 9 and replaced <= set(reads)  # q, k, v, o, gate, up, down and two norms a layer

    reads.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cortexflow.quantization.fp8_cache"):
        second = create(model, checkpoint, fp8_cache=cache)
    assert "FP8 cache hit: 2 layers" in caplog.text and "wrote" not in caplog.text
    assert entries(cache) == [entry.folder]
    assert not replaced & set(reads)
    assert sorted(reads) == sorted(set(sources.values()) - replaced)

    # Every tensor the hit's engine holds is the miss's, bit for bit; the miss's engine holds, besides, the q/k/v
    # and gate/up views into the fused tensors and (OpenVLA) the raw Llama norm weights the fold replaced.
    for name, tensor in second.weights.items():
        other = first.weights[name]
        assert tensor.dtype == other.dtype and torch.equal(bits(tensor), bits(other)), name
    views = {f"{layer.prefix}.{part}{scale}" for layer in entry.layers for part in ("q", "k", "v", "gate", "up")
             for scale in ("", ".fp8_scale")}
    assert set(first.weights) - set(second.weights) == views | (entry.checkpoint_names - set(entry.stored))

    image, ids = random_inputs(model, seed=11)
    expected = first.predict(image, prompt_tokens=ids)
    got = second.predict(image, prompt_tokens=ids)
    assert second.last_tokens.tolist() == first.last_tokens.tolist()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("model", ["openvla", "rt2"])
def test_cached_tensors_are_e4m3_with_scales_equal_to_a_fresh_quantisation(model, tmp_path):
    """Each stored projection equals the per-channel E4M3 quantisation of the fused, folded bf16 weights that the
    triton backend without FP8 prepares from the same checkpoint; the norm scales are the folded zeros."""
    checkpoint, cache = write_checkpoint(model, tmp_path / "ckpt", seed=6), tmp_path / "fp8"
    engine = create(model, checkpoint, fp8_cache=cache)
    entry = entry_of(model, checkpoint, cache)
    cached = entry.load()
    assert cached is not None
    plain_engine = (cf.create_openvla_inference(checkpoint, backend="triton", device=DEVICE, dtype="bfloat16",
                                                model_config=OPENVLA_IDS) if model == "openvla" else
                    cf.create_rt2_inference(checkpoint, backend="triton", device=DEVICE, dtype="bfloat16",
                                            model_config=RT2))
    plain = plain_engine.weights
    for layer in entry.layers:
        for part in ("qkv", "o", "gate_up", "down"):
            name = layer.name(part)
            assert cached[name].dtype == E4M3 and cached[fp8_scale_key(name)].dtype == torch.float32
            fresh = quantize_weight(plain[name])
            assert torch.equal(bits(cached[name]), bits(fresh.data.cpu())), name
            assert torch.equal(cached[fp8_scale_key(name)], fresh.scale.cpu()), name
            assert torch.equal(bits(cached[name]), bits(engine.weights[name].cpu())), name
        for norm in (layer.attn_norm, layer.mlp_norm):
            assert torch.equal(cached[norm], plain[norm].cpu()) and not cached[norm].any()
        assert f"{layer.prefix}.norms_folded" in cached
    assert set(cached) == set(entry.stored) | {f"{layer.prefix}.norms_folded" for layer in entry.layers}


def test_a_changed_checkpoint_or_changed_fp8_settings_miss(tmp_path):
    checkpoint, cache = write_checkpoint("openvla", tmp_path / "ckpt", seed=7), tmp_path / "fp8"
    create("openvla", checkpoint, fp8_cache=cache)
    first = entry_of("openvla", checkpoint, cache)
    create("openvla", checkpoint, fp8_cache=cache)
    assert entries(cache) == [first.folder]

    unfolded = TritonBackend.configured(fold_token_norms=False)
    create("openvla", checkpoint, backend=unfolded, fp8_cache=cache)
    second = entry_of("openvla", checkpoint, cache, TritonOptions(fp8="decoder", fold_token_norms=False))
    assert entries(cache) == sorted([first.folder, second.folder])
    assert "llm.layers.0.norms_folded" not in second.load()

    # The same folder rewritten with other values (a fine-tune saved over it): another checkpoint hash.
    write_checkpoint("openvla", checkpoint, seed=8)
    create("openvla", checkpoint, fp8_cache=cache)
    third = entry_of("openvla", checkpoint, cache)
    assert third.key_parts["checkpoint_hash"] != first.key_parts["checkpoint_hash"]
    assert entries(cache) == sorted([first.folder, second.folder, third.folder])

    # The compute dtype and the FP8 stages are part of the key too (FP8 engines run bfloat16 only: keys compared).
    keys = {entry_of("openvla", checkpoint, cache, options, dtype).folder
            for options, dtype in ((TritonOptions(fp8="decoder"), torch.bfloat16),
                                   (TritonOptions(fp8="decoder"), torch.float16),
                                   (TritonOptions(fp8="all"), torch.bfloat16))}
    assert len(keys) == 3 and third.folder in keys


def test_the_key_follows_the_quantised_layers_not_the_rest_of_the_config(tmp_path):
    """A config change that leaves the language-model layers as they are (prompt template, action bins, text
    length, vision tower, norm epsilon) keeps the entry; one that changes them (layer count, MLP width) misses."""
    from dataclasses import replace

    from cortexflow.checkpoints.openvla_layout import inspect_openvla_checkpoint
    from cortexflow.models.openvla import OpenVLAModel

    checkpoint, cache = write_checkpoint("openvla", tmp_path / "ckpt", seed=9), tmp_path / "fp8"
    config = inspect_openvla_checkpoint(checkpoint, OPENVLA_IDS).config
    options = TritonOptions(fp8="decoder")

    def folder(**changes):
        return fp8_layer_cache(cache, checkpoint, OpenVLAModel(replace(config, **changes)), options,
                               torch.bfloat16).folder

    same = folder()
    assert folder(prompt_template="Q: {instruction}? A:", n_action_bins=128, max_text_tokens=96,
                  siglip_layers=config.siglip_layers + 1, rms_norm_eps=1e-5) == same
    assert folder(llm_layers=config.llm_layers + 1) != same
    assert folder(llm_mlp_dim=config.llm_mlp_dim + 64) != same


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    checkpoint, cache = write_checkpoint("rt2", tmp_path / "ckpt", seed=9), tmp_path / "fp8"
    original = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        original(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # part of the file is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create("rt2", checkpoint, fp8_cache=cache)
    assert entries(cache) == []

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.warns(CortexFlowWarning, match="could not write the FP8 cache entry .*No space left"):
        create("rt2", checkpoint, fp8_cache=cache)
    assert entries(cache) == []

    monkeypatch.setattr(safetensors.torch, "save_file", original)
    create("rt2", checkpoint, fp8_cache=cache)
    assert entries(cache) == [entry_of("rt2", checkpoint, cache).folder]


def test_a_damaged_entry_is_removed_and_written_again(tmp_path):
    checkpoint, cache = write_checkpoint("openvla", tmp_path / "ckpt", seed=10), tmp_path / "fp8"
    create("openvla", checkpoint, fp8_cache=cache)
    entry = entry_of("openvla", checkpoint, cache)
    tensors = entry.folder / TENSORS
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    assert entry.load() is None and not entry.folder.exists()
    create("openvla", checkpoint, fp8_cache=cache)
    assert entry.load() is not None


def test_the_streaming_preparation_leaves_cached_layers_as_they_are(tmp_path, monkeypatch):
    """Weights of a hit on the host and a backend on a GPU take the streaming path (each layer moved, fused, folded
    and quantised before the next; forced here where the move is a no-op): the cached E4M3 tensors are kept as they
    are (fusing, folding and quantising skip them), and the result equals the miss's preparation."""
    from cortexflow.backends import triton_backend
    from cortexflow.checkpoints.openvla_layout import load_openvla_checkpoint

    checkpoint, cache = write_checkpoint("openvla", tmp_path / "ckpt", seed=12), tmp_path / "fp8"
    engine = create("openvla", checkpoint, fp8_cache=cache)
    entry = entry_of("openvla", checkpoint, cache)
    model, weights, _, _ = load_openvla_checkpoint(checkpoint, torch.device(DEVICE), torch.bfloat16, OPENVLA_IDS,
                                                   skip=entry.checkpoint_names)
    cached = entry.load()
    weights.update(cached)
    monkeypatch.setattr(triton_backend, "on_device", lambda tensor, device: False)
    backend = TritonBackend.configured(fp8="decoder")(torch.device(DEVICE), torch.bfloat16)
    prepared = backend.prepare_weights(model, model.prepare_weights(weights))
    for layer in entry.layers:
        for part in ("qkv", "o", "gate_up", "down"):
            name = layer.name(part)
            for key in (name, fp8_scale_key(name)):
                if DEVICE == "cpu":
                    assert prepared[key].data_ptr() == cached[key].data_ptr(), key
                assert torch.equal(bits(prepared[key]), bits(engine.weights[key])), key
            assert layer.name("q") not in prepared and layer.name("gate") not in prepared
        for norm in (layer.attn_norm, layer.mlp_norm):
            assert torch.equal(prepared[norm], engine.weights[norm]) and not prepared[norm].any()
        assert layer.name("norms_folded") in prepared


@pytest.mark.parametrize("create_inference", [cf.create_openvla_inference, cf.create_rt2_inference])
def test_fp8_cache_needs_fp8_precision(create_inference, tmp_path):
    # No checkpoint is there: the arguments are checked first.
    with pytest.raises(ConfigError, match=r"fp8_cache needs precision='fp8'.*got precision='default'"):
        create_inference(tmp_path / "missing", device="cpu", fp8_cache=True)
    with pytest.raises(ConfigError, match="fp8_cache needs precision='fp8'"):
        create_inference(tmp_path / "missing", device="cpu", fp8_cache=tmp_path / "fp8")
    with pytest.raises(ConfigError, match="fp8_cache must be True .*, False or a folder; got 3"):
        create_inference(tmp_path / "missing", device="cpu", precision="fp8", fp8_cache=3)


def test_the_default_folder_follows_the_cache_variables(monkeypatch, tmp_path):
    from cortexflow.quantization.fp8_cache import default_cache_dir

    monkeypatch.setenv("CORTEXFLOW_CACHE", str(tmp_path / "cf"))
    assert default_cache_dir() == tmp_path / "cf" / "fp8"
    monkeypatch.delenv("CORTEXFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cortexflow" / "fp8"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cortexflow" / "fp8"


# ---- the command line: run --fp8-cache, serve --fp8-cache --------------------------------------------------------
def _run_args(checkpoint: Path, image: Path, *extra: str) -> list[str]:
    return ["run", "--checkpoint", str(checkpoint), "--image", str(image), "--prompt-tokens", "1,40,41",
            "--device", DEVICE, "--dtype", "bfloat16", "--model-config", json.dumps(OPENVLA_IDS), *extra]


def test_run_keeps_the_layers_in_the_fp8_cache_folder(tmp_path, caplog):
    """``run --precision fp8 --fp8-cache DIR`` on OpenVLA: the first run writes one entry into DIR, the second
    reads it (logged as a hit) and prints the same tokens and actions."""
    from typer.testing import CliRunner

    from cortexflow.cli import app

    checkpoint = write_checkpoint("openvla", tmp_path / "vla", seed=4)
    image = tmp_path / "cam.npy"
    np.save(image, np.random.default_rng(4).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    args = _run_args(checkpoint, image, "--backend", "triton", "--precision", "fp8", "--fp8-cache",
                     str(tmp_path / "fp8"))
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert [p.name for p in entries(tmp_path / "fp8")] == [entry_of("openvla", checkpoint, tmp_path / "fp8").folder.name]
    with caplog.at_level(logging.INFO, logger="cortexflow.quantization.fp8_cache"):
        second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert any("FP8 cache hit" in r.getMessage() for r in caplog.records)
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["tokens"] == two["tokens"] and one["actions"] == two["actions"]


def test_fp8_cache_options_are_refused_in_the_command_lines_words(tmp_path):
    """Without ``--precision fp8``, and for a policy that has no FP8 language model (pi0 in ``run``, the demo pi0
    and rt1 in ``serve``), ``--fp8-cache`` is one error line that says what to change."""
    from typer.testing import CliRunner

    from cortexflow.cli import app
    from cortexflow.random_checkpoint import tiny_model_config
    from cortexflow.random_checkpoint import write_checkpoint as write_pi0

    runner = CliRunner()
    image = tmp_path / "cam.npy"
    np.save(image, np.zeros((28, 28, 3), dtype=np.uint8) + 7)

    def error(args) -> str:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    vla = write_checkpoint("openvla", tmp_path / "vla", seed=5)
    text = error(_run_args(vla, image, "--fp8-cache", str(tmp_path / "fp8")))
    assert "--fp8-cache" in text and "add --precision fp8 or drop --fp8-cache" in text
    assert not (tmp_path / "fp8").exists()
    pi0 = write_pi0(tmp_path / "pi0", tiny_model_config("pi0"))
    text = error(["run", "--checkpoint", str(pi0), "--image", str(image), "--prompt-tokens", "2,3", "--state", "0.1",
                  "--device", DEVICE, "--dtype", "bfloat16", "--backend", "triton", "--precision", "fp8",
                  "--fp8-cache", "default"])
    assert "--fp8-cache keeps the FP8 language-model layers of openvla/rt2; pi0" in text and "drop --fp8-cache" in text
    pytest.importorskip("websockets", reason="serve checks for the websockets package before its options")
    text = error(["serve", "--checkpoint", "demo", "--device", "cpu", "--fp8-cache", "default"])
    assert "pi0/pi05 quantise only their action expert at load: drop --fp8-cache" in text
    text = error(["serve", "--checkpoint", str(tmp_path), "--model", "rt1", "--device", "cpu", "--fp8-cache", "x"])
    assert "--model rt1 does not take" in text and "--fp8-cache" in text


def test_the_onnx_cache_keeps_its_own_variable_and_shares_the_rest(monkeypatch, tmp_path):
    from cortexflow.onnx.cache import default_cache_dir as onnx_cache_dir

    monkeypatch.setenv("CORTEXFLOW_CACHE", str(tmp_path / "cf"))
    assert onnx_cache_dir() == tmp_path / "cf" / "onnx"
    monkeypatch.setenv("CORTEXFLOW_ONNX_CACHE", str(tmp_path / "own"))
    assert onnx_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("CORTEXFLOW_ONNX_CACHE")
    monkeypatch.delenv("CORTEXFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_cache_dir() == tmp_path / "xdg" / "cortexflow" / "onnx"

"""``precision="fp8"`` and ``TritonOptions.fp8``: the checks at engine creation and the quantisation at load."""

import contextlib

import pytest
import torch

from cortexflow.backends.triton_options import TritonOptions
from cortexflow.errors import BackendUnavailableError, ConfigError
from cortexflow.kernels import runtime
from cortexflow.quantization.fp8 import E4M3, fp8_scale_key, quantize_weight
from cortexflow.quantization.precision import backend_for_precision, parse_precision


def test_precision_values_are_checked_with_the_argument_named():
    assert parse_precision(None) == "default" and parse_precision(" FP8 ") == "fp8"
    with pytest.raises(ConfigError, match="--precision must be 'default' or 'fp8', got 'int8'"):
        parse_precision("int8", "--precision")


def test_fp8_options_name_stages():
    assert TritonOptions().fp8_stages == frozenset()
    assert TritonOptions(fp8="all").fp8_stages == {"prefix", "decoder"}
    assert TritonOptions.parse("fp8=decoder,pdl=off").fp8_stages == {"decoder"}
    for bad in ("vision", "prefix,decoder", "decoder+decoder", 8):
        with pytest.raises(ConfigError, match="TritonOptions.fp8"):
            TritonOptions(fp8=bad)


def test_fp8_is_refused_on_the_cpu_and_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="precision='fp8': FP8 needs a CUDA GPU, got device 'cpu'; use precision='default'"):
        backend_for_precision("triton", "fp8", torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="interpreter"):
        backend_for_precision("triton", "fp8", torch.device("cpu"), torch.bfloat16)
    assert backend_for_precision("pytorch", "default", torch.device("cpu"), torch.float32) == "pytorch"


@contextlib.contextmanager
def gpu_of(arch: int):
    """The ``meta`` device standing for a GPU of compute capability ``arch`` (compile-check's target), restored after."""
    previous = runtime.set_compile_target(runtime.CompileTarget(arch=arch))
    try:
        yield torch.device("meta")
    finally:
        runtime.set_compile_target(previous)


@pytest.fixture
def hopper():
    with gpu_of(90) as device:
        yield device


def test_fp8_needs_ada_or_hopper_bfloat16_and_the_triton_backend(monkeypatch, hopper):
    from cortexflow.backends.triton_backend import TritonBackend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    chosen = backend_for_precision("triton", "fp8", hopper, torch.bfloat16)
    assert issubclass(chosen, TritonBackend) and chosen._options.fp8 == "decoder"
    # The per-stage switch of a configured backend is kept; one without FP8 gets the decoder layers.
    everything = TritonBackend.configured(fp8="all")
    assert backend_for_precision(everything, "fp8", hopper, torch.bfloat16) is everything
    assert backend_for_precision(TritonBackend, "fp8", hopper, torch.bfloat16)._options.fp8 == "decoder"
    with pytest.raises(ConfigError, match="runs on the triton backend; got backend 'pytorch'"):
        backend_for_precision("pytorch", "fp8", hopper, torch.bfloat16)
    with pytest.raises(ConfigError, match="dtype='bfloat16'"):
        backend_for_precision("triton", "fp8", hopper, torch.float32)
    runtime.set_compile_target(runtime.CompileTarget(arch=86))
    with pytest.raises(ConfigError, match="compute capability 8.9 or later .* has 8.6"):
        backend_for_precision("triton", "fp8", hopper, torch.bfloat16)


def test_engine_creation_refuses_fp8_before_loading(tmp_path, monkeypatch):
    import cortexflow as cf

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # No checkpoint is there: the precision check comes first.
    with pytest.raises(ConfigError, match="precision='fp8': FP8 needs a CUDA GPU"):
        cf.create_pi0_inference(tmp_path / "missing", backend="triton", device="cpu", precision="fp8")
    with pytest.raises(ConfigError, match="precision='fp8': FP8 needs a CUDA GPU"):
        cf.create_openvla_inference(tmp_path / "missing", backend="triton", device="cpu", precision="fp8")
    with pytest.raises(ConfigError, match="precision must be 'default' or 'fp8'"):
        cf.create_pi0_inference(tmp_path / "missing", device="cpu", precision="fp16")


def test_triton_backend_option_checks_device_and_dtype(monkeypatch):
    from cortexflow.backends.triton_backend import TritonBackend

    with gpu_of(90) as device, pytest.raises(ConfigError, match="bfloat16 activations"):
        TritonBackend(device, torch.float32, TritonOptions(fp8="decoder"))
    with gpu_of(80) as device, pytest.raises(BackendUnavailableError, match="fp8='decoder'.*8.0"):
        TritonBackend(device, torch.bfloat16, TritonOptions(fp8="decoder"))


@pytest.mark.parametrize("stages", ["decoder", "prefix", "all"])
def test_quantisation_at_load_is_deterministic_and_keeps_the_layout(stages):
    """Pi0's tiny model prepared twice by the triton backend with ``fp8=stages``: the chosen layers' projections are
    E4M3 with per-channel scales equal to quantising the fused (and folded) bf16 weights, the q/k/v names are
    views into the fused E4M3 data, the other stages keep bf16, and both preparations give the same bits."""
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.models.pi0 import model_class
    from cortexflow.random_checkpoint import random_weights, tiny_model_config

    config = tiny_model_config("pi0")
    model = model_class(config.model_type)(config)
    raw = {k: v.to(torch.bfloat16) for k, v in random_weights(config, 3, torch.float32, torch.device("cpu")).items()}
    plain = TritonBackend(torch.device("cpu"), torch.bfloat16).prepare_weights(model, dict(raw))
    backend = TritonBackend(torch.device("cpu"), torch.bfloat16, TritonOptions(fp8=stages))
    first = backend.prepare_weights(model, dict(raw))
    second = backend.prepare_weights(model, dict(raw))
    groups = model.fusable_weights()
    chosen = set(TritonOptions(fp8=stages).fp8_stages)
    for stage, layers in (("prefix", groups.encoder_layers), ("decoder", groups.decoder_layers)):
        assert layers
        for layer in layers:
            for part in ("qkv", "o", "gate_up", "down"):
                name = layer.name(part)
                if stage not in chosen:
                    assert first[name].dtype == torch.bfloat16
                    continue
                assert first[name].dtype == E4M3
                expected = quantize_weight(plain[name])
                assert torch.equal(first[name].view(torch.uint8), expected.data.view(torch.uint8))
                assert torch.equal(first[fp8_scale_key(name)], expected.scale)
                assert torch.equal(second[name].view(torch.uint8), first[name].view(torch.uint8))
            q, qkv = first[layer.name("q")], first[layer.name("qkv")]
            if stage in chosen:
                assert q.dtype == E4M3 and q.data_ptr() == qkv.data_ptr()
                assert torch.equal(first[fp8_scale_key(layer.name("q"))], first[fp8_scale_key(layer.name("qkv"))][:q.shape[0]])


def _tiny_pi0_bf16():
    from cortexflow.models.pi0 import model_class
    from cortexflow.random_checkpoint import random_weights, tiny_model_config

    config = tiny_model_config("pi0")
    model = model_class(config.model_type)(config)
    raw = {k: v.to(torch.bfloat16) for k, v in random_weights(config, 3, torch.float32, torch.device("cpu")).items()}
    return model, raw


@pytest.mark.parametrize("stages", ["decoder", "all"])
def test_host_loaded_weights_are_quantised_layer_by_layer_with_the_same_bits(stages, monkeypatch):
    """Weights that are not on the backend's device yet take the streaming path (each FP8 layer moved, fused,
    folded and quantised before the next); forced on weights already on the device (where the move is a no-op), it
    gives the same tensors, bit for bit, as quantising after everything is on the device."""
    from cortexflow.backends import triton_backend
    from cortexflow.backends.triton_backend import TritonBackend

    model, raw = _tiny_pi0_bf16()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw = {k: v.to(device) for k, v in raw.items()}
    backend = TritonBackend(device, torch.bfloat16, TritonOptions(fp8=stages))
    plain = backend.prepare_weights(model, dict(raw))
    streamed_layers = []
    original = triton_backend.prepare_fp8_layer
    monkeypatch.setattr(triton_backend, "on_device", lambda tensor, device: False)
    monkeypatch.setattr(triton_backend, "prepare_fp8_layer",
                        lambda w, layer, fold: (streamed_layers.append(layer.prefix), original(w, layer, fold)))
    streamed = backend.prepare_weights(model, dict(raw))
    groups = model.fusable_weights()
    expected = [layer.prefix for layer in groups.decoder_layers]
    if stages == "all":
        expected = [layer.prefix for layer in groups.encoder_layers] + expected
    assert streamed_layers == expected
    assert streamed.keys() == plain.keys()
    for name, tensor in plain.items():
        other = streamed[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(other.view(torch.uint8), tensor.view(torch.uint8)) if tensor.dtype == E4M3 else \
            torch.equal(other, tensor), name


def test_token_vlas_are_read_to_the_host_for_fp8():
    from cortexflow.factory import load_device

    gpu = torch.device("cuda", 0)
    assert load_device("fp8", gpu) == torch.device("cpu") and load_device("default", gpu) == gpu


def test_host_loaded_weights_reach_the_device_one_fp8_layer_at_a_time(hopper):
    """Weights on the host and a backend on a GPU (the meta device standing for an H100): when a layer is
    prepared, the layers before it are E4M3 on the device and the layers after it are still on the host; at the
    end every tensor is on the device."""
    from cortexflow.backends import triton_fp8
    from cortexflow.backends.triton_backend import TritonBackend

    model, raw = _tiny_pi0_bf16()
    backend = TritonBackend(hopper, torch.bfloat16, TritonOptions(fp8="decoder"))
    layers = model.fusable_weights().decoder_layers
    weights = dict(raw)
    seen = []

    def prepare(layer):
        i = len(seen)
        seen.append(layer.prefix)
        for before in layers[:i]:
            assert weights[before.name("down")].dtype == E4M3 and weights[before.name("down")].device.type == "meta"
        for after in layers[i + 1:]:
            assert weights[after.name("down")].device.type == "cpu"
        from cortexflow.backends.triton_backend import prepare_fp8_layer

        prepare_fp8_layer(weights, layer, False)

    triton_fp8.stream_layers_to_device(weights, layers, hopper, prepare)
    assert seen == [layer.prefix for layer in layers]
    assert all(t.device.type == "meta" for t in weights.values())
    prepared = backend.prepare_weights(model, dict(raw))
    assert all(t.device.type == "meta" for t in prepared.values())
    assert all(prepared[layer.name(p)].dtype == E4M3 for layer in layers for p in ("qkv", "o", "gate_up", "down"))


@pytest.mark.parametrize("args", [
    ["verify", "--backend", "triton", "--precision", "fp8"],
    ["bench", "--backends", "triton", "--precision", "fp8"],
    ["profile", "--backend", "triton", "--precision", "fp8"],
    ["serve", "--checkpoint", "demo", "--backend", "triton", "--precision", "fp8"],
    ["run", "--checkpoint", "CHECKPOINT", "--image", "IMAGE", "--prompt-tokens", "2,3", "--state", "0.1",
     "--backend", "triton", "--precision", "fp8"],
], ids=["verify", "bench", "profile", "serve", "run"])
def test_cli_refuses_fp8_on_the_cpu_in_its_own_words(args, monkeypatch, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cortexflow.cli import app

    if args[0] == "serve":
        pytest.importorskip("websockets", reason="serve checks for the websockets package before its options")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    image = tmp_path / "view.png"
    Image.new("RGB", (8, 8)).save(image)
    args = [str(image) if a == "IMAGE" else str(tmp_path) if a == "CHECKPOINT" else a for a in args]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "--precision fp8: FP8 needs a CUDA GPU, got device 'cpu'; use --precision default" in " ".join(result.output.split())


def test_cli_names_the_backend_fp8_needs(monkeypatch):
    from typer.testing import CliRunner

    from cortexflow.cli import app

    result = CliRunner().invoke(app, ["verify", "--backend", "pytorch", "--precision", "fp8", "--device", "cpu"])
    assert result.exit_code == 2 and "use --backend triton" in " ".join(result.output.split())


def test_verify_with_fp8_stages_compares_with_the_bf16_baseline():
    """``verify`` of a backend with FP8 stages: the FP8 limits, the cosine, and each module compared with the same
    backend without FP8 (``vs_bf16``); a single-op module runs on the raw weights (single ops take no E4M3), so it
    equals the baseline's."""
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.tools.verify import FP8_MIN_COSINE, FP8_THRESHOLD, run_verify

    # The triton backend runs on a CPU only in the interpreter, which a CUDA machine's test run leaves off.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs a GPU of compute capability 8.9 or later")
    report = run_verify("pi0", TritonBackend.configured(fp8="prefix"), "pytorch", size="tiny", device=device,
                        dtype="bfloat16", views=1, repeats=1, modules=["prefix_layer"])
    assert report["fp8"] == {"stages": "prefix", "min_cosine": FP8_MIN_COSINE,
                             "baseline": "the same backend without FP8, bfloat16"}
    assert report["threshold_rel_l2"] == FP8_THRESHOLD and report["backend_options"]["fp8"] == "prefix"
    (row,) = report["modules"]
    assert row["weights"].startswith("raw") and row["status"] == "ok"
    assert 0.999 < row["cosine"] <= 1.0 + 1e-12 and 0 < row["rel_l2"] < 2e-2
    assert row["vs_bf16"]["rel_l2"] == 0.0

"""ONNX export and the ONNX Runtime backend on tiny models (CPU).

Exports are shared across tests (module-scoped fixtures) to keep the file fast: a tiny Pi0 from a
LeRobot-layout checkpoint (dynamic batch 1-6, unrolled decoder, opset 20) and a tiny Pi0.5 from an
openpi-layout checkpoint (dynamic batch 1-6, one-step decoder, opset 23, onnxslim). Every comparison
uses fresh random non-zero inputs and reports max |Δ| and ‖Δ‖/‖ref‖ against the PyTorch fp32 stage.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"the ONNX tests need {_module}: pip install 'cortexflow[onnx]'")

from typer.testing import CliRunner  # noqa: E402

import cortexflow as cf  # noqa: E402
from cortexflow.backends.onnx_backend import OnnxBackend  # noqa: E402
from cortexflow.checkpoints.loader import load_pi0_checkpoint  # noqa: E402
from cortexflow.cli import app  # noqa: E402
from cortexflow.errors import BackendUnavailableError, ConfigError, InputError  # noqa: E402
from cortexflow.onnx import OnnxExportError, OrtStage, checkpoint_hash, export_checkpoint, read_manifest  # noqa: E402
from cortexflow.onnx import exporter as onnx_exporter  # noqa: E402
from cortexflow.onnx.cache import cached_policy_bundle  # noqa: E402
from cortexflow.onnx.settings import BatchSpec, ExportSettings  # noqa: E402
from cortexflow.onnx.stages import example_inputs, stage_class  # noqa: E402
from cortexflow.random_checkpoint import random_weights, tiny_model_config, write_checkpoint  # noqa: E402

runner = CliRunner()
FP32_LIMIT = 1e-5  # ORT fp32 vs PyTorch fp32, per stage


def errors(out, ref) -> tuple[float, float]:
    """(max |Δ|, ‖Δ‖/‖ref‖) in fp64."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape
    delta = out - ref
    return float(np.abs(delta).max()), float(np.linalg.norm(delta) / np.linalg.norm(ref))


def _tiny_overrides(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "model_type"}


def _export(tmp_path_factory, model: str, layout: str, **settings):
    config = tiny_model_config(model)
    folder = tmp_path_factory.mktemp(f"{model}_ckpt")
    checkpoint = write_checkpoint(folder, config, seed=11, layout=layout)
    out = tmp_path_factory.mktemp(f"{model}_onnx")
    manifest = export_checkpoint(checkpoint, out, model=model, batch="dynamic:1-6", num_views=2,
                                 model_config=_tiny_overrides(config), **settings)
    loaded = load_pi0_checkpoint(checkpoint, None, torch.device("cpu"), torch.float32, _tiny_overrides(config))
    return {"checkpoint": checkpoint, "out": out, "manifest": manifest, "model": loaded.model,
            "weights": loaded.weights, "decoder": settings.get("decoder", "unrolled")}


@pytest.fixture(scope="module")
def pi0_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "pi0", "lerobot", decoder="unrolled", opset=20)


@pytest.fixture(scope="module")
def pi05_bundle(tmp_path_factory):
    return _export(tmp_path_factory, "pi05", "openpi", decoder="step", opset=23, simplify=True)


@pytest.fixture(params=["pi0", "pi05"])
def bundle(request):
    return request.getfixturevalue(f"{request.param}_bundle")


def _ort_stage(bundle, stage: str) -> OrtStage:
    manifest = bundle["manifest"]
    entry = manifest["stages"][stage]
    return OrtStage(stage, bundle["out"] / entry["file"], entry, manifest["settings"]["batch"])


# ---- the manifest ---------------------------------------------------------------------------------
def test_manifest_records_shapes_settings_hash_and_versions(bundle):
    manifest = read_manifest(bundle["out"])
    assert manifest == json.loads(json.dumps(bundle["manifest"]))
    assert manifest["settings"]["batch"] == {"mode": "dynamic", "min": 1, "max": 6, "dim_name": "batch"}
    assert manifest["source"]["checkpoint_hash"] == checkpoint_hash(bundle["checkpoint"])
    assert manifest["toolchain"]["exporter"].startswith("torch.onnx.export(dynamo=True")
    for package in ("torch", "onnx", "onnxscript", "onnxruntime"):
        assert manifest["toolchain"][package]
    assert set(manifest["stages"]) == {"vision", "prefix", "decoder"}
    vision = manifest["stages"]["vision"]
    assert vision["inputs"] == [{"name": "images", "shape": ["batch", 2, 3, 224, 224], "dtype": "float32"}]
    prefix = manifest["stages"]["prefix"]
    assert [i["name"] for i in prefix["inputs"]] == ["image_tokens", "image_masks", "token_ids", "token_mask"]
    assert [i["dtype"] for i in prefix["inputs"]] == ["float32", "bool", "int64", "bool"]
    assert prefix["outputs"][0]["shape"][:2] == [2, "batch"]  # (layers, batch, prefix, kv heads, head dim)
    decoder = manifest["stages"]["decoder"]
    if bundle["decoder"] == "step":
        assert manifest["settings"]["opset"] == 23 and manifest["settings"]["simplify"]
        assert decoder["simplifier"] == "onnxslim"
        assert [i["name"] for i in decoder["inputs"]][-2:] == ["x_t", "t"]  # Pi0.5: no state input
        assert decoder["outputs"][0]["name"] == "velocity"
    else:
        assert [i["name"] for i in decoder["inputs"]][-2:] == ["noise", "state"]
        assert decoder["outputs"][0] == {"name": "actions", "shape": ["batch", 5, 8], "dtype": "float32"}
    for entry in manifest["stages"].values():
        assert (bundle["out"] / entry["file"]).is_file() and entry["external_data"] is None
        assert entry["parity"]["rel_l2"] <= FP32_LIMIT


# ---- dynamic batch: each stage at batch 1, 3 and 6 against PyTorch --------------------------------
@pytest.mark.parametrize("stage", ["vision", "prefix", "decoder"])
def test_dynamic_stage_matches_pytorch_at_batch_1_3_6(bundle, stage):
    model, weights = bundle["model"], bundle["weights"]
    module = stage_class(stage, bundle["decoder"])(model, weights, torch.float32, 2, model.config.chunk_size)
    session = _ort_stage(bundle, stage)
    for batch in (1, 3, 6):
        inputs = example_inputs(module.input_specs(), batch, model, seed=100 + batch)  # not the export's inputs
        with torch.inference_mode():
            reference = module(*inputs)
        reference = reference if isinstance(reference, tuple) else (reference,)
        outputs = session(**dict(zip(module.input_names, inputs)))
        for name, ref in zip(module.output_names, reference):
            got = outputs[name]
            assert got.shape == ref.shape and got.dtype == ref.dtype
            if ref.dtype == torch.bool:
                assert torch.equal(got, ref), (stage, batch, name)
                continue
            max_abs, rel = errors(got, ref)
            assert rel <= FP32_LIMIT, f"{stage} batch {batch} {name}: max|Δ| {max_abs:.2e} ‖Δ‖/‖ref‖ {rel:.2e}"


# ---- bad inputs ---------------------------------------------------------------------------------
def test_bad_inputs_name_the_stage_and_the_allowed_shapes(pi0_bundle):
    vision = _ort_stage(pi0_bundle, "vision")
    good = torch.rand(2, 2, 3, 224, 224) * 2 - 1
    with pytest.raises(InputError, match=r"onnx stage 'vision'.*rank 4.*images \(B, 2, 3, 224, 224\) float32 with B in 1\.\.6"):
        vision(images=good[0])
    with pytest.raises(InputError, match=r"onnx stage 'vision'.*dtype float16; expected float32"):
        vision(images=good.half())
    with pytest.raises(InputError, match=r"batch 7, outside the exported range 1\.\.6.*B in 1\.\.6"):
        vision(images=torch.rand(7, 2, 3, 224, 224))
    with pytest.raises(InputError, match=r"axis 1 must be 2"):
        vision(images=torch.rand(1, 3, 3, 224, 224))
    prefix = _ort_stage(pi0_bundle, "prefix")
    with pytest.raises(InputError, match=r"onnx stage 'prefix': missing input\(s\) \['token_mask'\]"):
        prefix(image_tokens=torch.rand(1, 512, 64), image_masks=torch.ones(1, 2, dtype=torch.bool),
               token_ids=torch.zeros(1, 48, dtype=torch.int64))
    with pytest.raises(InputError, match=r"input 'token_ids' has batch 2 on axis 0 but another input has batch 1"):
        prefix(image_tokens=torch.rand(1, 512, 64), image_masks=torch.ones(1, 2, dtype=torch.bool),
               token_ids=torch.zeros(2, 48, dtype=torch.int64), token_mask=torch.ones(1, 48, dtype=torch.bool))


def test_static_export_keeps_its_batch_and_says_so(tmp_path):
    manifest = export_checkpoint("demo", tmp_path, model="pi0", stages="vision", batch="static:2")
    entry = manifest["stages"]["vision"]
    assert entry["inputs"][0]["shape"] == [2, 2, 3, 224, 224]
    assert entry["parity"]["batches"] == [2]
    stage = OrtStage("vision", tmp_path / entry["file"], entry, manifest["settings"]["batch"])
    assert stage(images=torch.rand(2, 2, 3, 224, 224))["image_tokens"].shape == (2, 512, 64)
    with pytest.raises(InputError, match=r"static batch of 2; re-export with a dynamic batch"):
        stage(images=torch.rand(3, 2, 3, 224, 224))


def test_settings_are_validated():
    assert BatchSpec.parse("dynamic:1-6").check_sizes == [1, 3]
    assert str(BatchSpec.parse("static")) == "static:1"
    for bad in ("dynamic:0-4", "dynamic:5-2", "sometimes"):
        with pytest.raises(ConfigError):
            BatchSpec.parse(bad)
    with pytest.raises(ConfigError, match="opset 19"):
        ExportSettings.make(opset=19)
    with pytest.raises(ConfigError, match="bfloat16"):
        ExportSettings.make(dtype="bf16")
    with pytest.raises(ConfigError, match="decoder 'loop'"):
        ExportSettings.make(decoder="loop")


def test_external_data_above_the_threshold(tmp_path):
    manifest = export_checkpoint("demo", tmp_path, model="pi05", stages="vision", batch="static",
                                 external_data_threshold=1024)
    entry = manifest["stages"]["vision"]
    assert entry["external_data"] == "vision.onnx.data"
    assert (tmp_path / "vision.onnx.data").stat().st_size > (tmp_path / "vision.onnx").stat().st_size
    assert entry["parity"]["rel_l2"] <= FP32_LIMIT  # ORT loaded it with its data file


# ---- backend="onnx": engine, cache ----------------------------------------------------------------
def test_engine_on_onnx_backend_matches_pytorch_and_reuses_the_cache(pi0_bundle, tmp_path):
    checkpoint = pi0_bundle["checkpoint"]
    overrides = _tiny_overrides(pi0_bundle["model"].config)
    backend = OnnxBackend.configured(cache_dir=tmp_path / "cache", batch="dynamic:1-4")
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8) for _ in range(3)]
    states = [rng.standard_normal(8).astype(np.float32) for _ in range(3)]
    tokens = [[2, 17, 40, 99], [2, 5], [2, 300, 301, 302, 8]]
    noise = rng.standard_normal((3, 5, 8)).astype(np.float32)

    def engine(which):
        return cf.create_pi0_inference(checkpoint, num_views=2, backend=which, device="cpu", dtype="float32",
                                       model_config=overrides)

    reference = engine("pytorch")
    first = engine(backend)
    # the exported prefix stage takes max_token_len tokens: no shorter prompt buckets on this backend
    assert first.prompt_buckets == (overrides["max_token_len"],) and len(reference.prompt_buckets) > 1
    got = first.predict(images[0], state=states[0], prompt_tokens=tokens[0], noise=noise[0])
    want = reference.predict(images[0], state=states[0], prompt_tokens=tokens[0], noise=noise[0])
    max_abs, rel = errors(got, want)
    assert rel <= FP32_LIMIT, (max_abs, rel)
    got = first.predict_batch(images, batch_states=states, batch_prompt_tokens=tokens, noise=noise)
    want = reference.predict_batch(images, batch_states=states, batch_prompt_tokens=tokens, noise=noise)
    max_abs, rel = errors(got, want)
    assert got.shape == (3, 5, 8) and rel <= FP32_LIMIT, (max_abs, rel)
    assert first.backend.exports == 1
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()

    second = engine(backend)  # a new engine start: loads from the cache, exports nothing
    again = second.predict(images[0], state=states[0], prompt_tokens=tokens[0], noise=noise[0])
    assert second.backend.exports == 0 and second.backend.bundle_dir == entries[0]
    np.testing.assert_array_equal(again, first.predict(images[0], state=states[0], prompt_tokens=tokens[0], noise=noise[0]))
    with pytest.raises(InputError, match=r"onnx stage 'vision'.*outside the exported range 1\.\.4"):
        second.predict_batch(images + images[:2], batch_states=states + states[:2],
                             batch_prompt_tokens=tokens + tokens[:2])


def test_ops_are_not_silently_pytorch():
    backend = OnnxBackend(torch.device("cpu"), torch.float32)
    with pytest.raises(NotImplementedError, match="single op 'linear' is not exported"):
        backend.linear(torch.ones(1, 2), torch.ones(2, 2))


def test_failed_parity_is_not_cached(tmp_path, monkeypatch):
    config = tiny_model_config("pi0")
    model = cf.Pi0Model(config)
    monkeypatch.setitem(onnx_exporter.CHECK_TOLERANCE, torch.float32, 0.0)  # no export can pass
    with pytest.raises(OnnxExportError, match=r"stage 'vision' does not match PyTorch.*not kept"):
        cached_policy_bundle(model, random_weights(config, 1), num_views=1, chunk_size=5, settings=ExportSettings(),
                             cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unloadable_export_is_not_cached(tmp_path, monkeypatch):
    from cortexflow.encoders import cached_encoder_export, create_encoder

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : simulated")

    monkeypatch.setattr(onnx_exporter, "ort_session", refuse)
    with pytest.raises(OnnxExportError, match="ONNX Runtime cannot load the file"):
        cached_encoder_export(create_encoder("siglip_tiny"), cache_dir=tmp_path, batch="static")
    assert list(tmp_path.iterdir()) == []


def test_package_imports_without_onnx():
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "onnxslim", "onnx_ir"):
                    raise ImportError(f"No module named {name!r}")
        sys.meta_path.insert(0, Block())
        import torch, cortexflow, cortexflow.onnx, cortexflow.encoders, cortexflow.tools.batch_scaling
        from cortexflow.errors import BackendUnavailableError
        try:
            cortexflow.create_pi0_inference("unused", backend="onnx", device="cpu")
        except BackendUnavailableError as err:
            print("unavailable:", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "unavailable:" in done.stdout and 'pip install "cortexflow[onnx]"' in done.stdout


# ---- perception encoders ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["siglip_tiny", "vit_small_patch16_224", "resnet18d"])
@pytest.mark.parametrize("batch", ["static", "dynamic:1-6"])
def test_encoder_export_matches_pytorch(name, batch, tmp_path):
    from cortexflow.encoders import TIMM_ENCODERS, create_encoder, export_encoder, load_encoder_session
    from cortexflow.encoders.timm_compat import timm_available

    if name in TIMM_ENCODERS and not timm_available():
        pytest.skip("timm is not importable (pip install --no-deps timm pyyaml huggingface_hub safetensors pillow)")
    encoder = create_encoder(name, seed=3)
    manifest = export_encoder(encoder, tmp_path, batch=batch)
    assert manifest["encoder"]["name"] == name and manifest["settings"]["batch"]["mode"] == batch.split(":")[0]
    session = load_encoder_session(tmp_path)
    output = manifest["stages"]["encoder"]["outputs"][0]["name"]
    for size in ((1,) if batch == "static" else (1, 3, 6)):
        images = encoder.example_input(size, seed=50 + size)
        with torch.inference_mode():
            want = encoder(images)
        max_abs, rel = errors(session(images=images)[output], want)
        assert rel <= FP32_LIMIT, f"{name} {batch} batch {size}: max|Δ| {max_abs:.2e} ‖Δ‖/‖ref‖ {rel:.2e}"
    if batch == "static":
        with pytest.raises(InputError, match="onnx stage 'encoder'"):
            session(images=encoder.example_input(2))


# ---- command line: export, verify --backend onnx, bench --batch-scaling ---------------------------
def test_cli_export_demo_and_errors(tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", "demo", "--model", "pi05", "--stages", "prefix",
                                 "--batch", "static", "--out", str(tmp_path / "out"), "--json", "-"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert list(manifest["stages"]) == ["prefix"] and (tmp_path / "out" / "prefix.onnx").is_file()
    result = runner.invoke(app, ["export", "--checkpoint", "demo", "--opset", "19", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "opset 19 is not supported" in result.output
    result = runner.invoke(app, ["export", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "either --checkpoint" in result.output
    result = runner.invoke(app, ["export", "--checkpoint", "demo", "--stages", "vision,lm", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "unknown stage" in result.output


def test_cli_verify_onnx_per_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("CORTEXFLOW_ONNX_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["verify", "--backend", "onnx", "--model", "pi0", "--size", "tiny", "--repeats", "1",
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["backend"] == "onnx"
    rows = {r["name"]: r for r in report["modules"]}
    assert list(rows) == ["vision_encoder", "prefix", "decoder", "actions"]
    for row in rows.values():
        assert 0 < row["rel_l2"] <= FP32_LIMIT and row["max_abs"] > 0, row


def test_batch_scaling_rows():
    from cortexflow.tools.batch_scaling import scaling_rows

    rows = scaling_rows({1: [10.0, 11.0, 9.0], 2: [15.0], 4: [40.0]}, flops_per_image=1e9, peak_flops=1e12)
    assert [r["scaling_efficiency"] for r in rows] == [1.0, 0.75, 1.0]
    assert [r["marginal_ms_per_image"] for r in rows] == [None, 5.0, 12.5]
    assert rows[1]["images_per_s"] == pytest.approx(2 / 0.015)
    assert rows[2]["achieved_gflops"] == pytest.approx(4 / 0.040)
    assert rows[2]["pct_of_matmul_peak"] == pytest.approx(10.0)


def test_cli_bench_batch_scaling(tmp_path, monkeypatch):
    monkeypatch.setenv("CORTEXFLOW_ONNX_CACHE", str(tmp_path / "cache"))
    json_path, png_path = tmp_path / "scaling.json", tmp_path / "scaling.png"
    result = runner.invoke(app, ["bench", "--batch-scaling", "--encoder", "siglip_tiny", "--backends", "pytorch,onnx",
                                 "--batches", "1,2,3", "--iters", "3", "--warmup", "1", "--max-seconds", "0.5",
                                 "--device", "cpu", "--json", str(json_path), "--png", str(png_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["environment"]["cpu"] and report["environment"]["onnxruntime"]
    assert report["encoder"]["flops_per_image"] > 0
    for entry in report["backends"]:
        assert entry["status"] == "ok", entry
        assert [r["batch"] for r in entry["rows"]] == [1, 2, 3]
        assert entry["rows"][0]["scaling_efficiency"] == 1.0
        assert all(r["achieved_gflops"] > 0 and r["images_per_s"] > 0 for r in entry["rows"])
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "L(B)/(B·L(1))" in result.stdout


def test_batch_scaling_skips_triton_for_timm():
    from cortexflow.tools.batch_scaling import _runner

    with pytest.raises(BackendUnavailableError, match="no triton path"):
        _runner("resnet18d", "triton", torch.device("cpu"), torch.float32, 0, [1], None, 20, None, print)


def test_weights_fingerprint_samples_large_tensors_within_range():
    """A weight of more than 2^24 elements (where a float32 position would round past the end): the sampled
    positions run from the first element to the last, evenly, all in range; the fingerprint sees a change in
    the last element and none between the samples."""
    from cortexflow.onnx.hashing import SAMPLE_ELEMENTS, sample_positions, weights_fingerprint

    numel = 2**24 + 4  # a float32 linspace puts its last position at 2**24 + 4, one past the end
    positions = sample_positions(numel, torch.device("cpu"))
    assert positions[0] == 0 and positions[-1] == numel - 1 and len(positions) == SAMPLE_ELEMENTS
    assert (positions.diff() > 0).all() and positions.diff().max() - positions.diff().min() <= 1
    weights = {"w": torch.randint(0, 255, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}
    before = weights_fingerprint(weights)
    weights["w"][1] += 1  # between samples 0 and 1
    assert weights_fingerprint(weights) == before
    weights["w"][-1] += 1
    assert weights_fingerprint(weights) != before

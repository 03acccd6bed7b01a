"""``cortexflow verify --backend onnx``: each exported stage in ONNX Runtime against the PyTorch fp32 reference.

Both sides get the same weights (the ORT side's rounded to the export dtype; the reference gets those
rounded values in fp32, so what is measured is the error of the computation) and the same fresh random
non-zero inputs. Every stage is fed the *reference's* output of the stage before it (so an error shows
where it arises, not where it accumulates); the last row, ``actions``, chains the ONNX stages from the
images to the actions and compares with the PyTorch chain.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.config import dtype_name
from cortexflow.errors import ConfigError
from cortexflow.models.pi0 import Pi0Model, model_class
from cortexflow.onnx.exporter import rel_error
from cortexflow.onnx.settings import DEFAULT_BATCH, parse_export_dtype

#: ``‖Δ‖/‖ref‖`` every stage must meet, by export dtype (ORT fp32 vs PyTorch fp32: 1e-5 on CPU).
STAGE_THRESHOLDS = {torch.float32: 1e-5, torch.float16: 2e-2}
ROWS = ("vision_encoder", "prefix", "decoder", "actions")


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def policy_inputs(model: Pi0Model, batch: int, num_views: int, chunk: int, prompt_len: int = 20, seed: int = 0) -> dict:
    """Random engine-like buffers: images in [-1, 1], all views present, ``prompt_len`` valid token ids
    (BOS first), noise and state ~ N(0, 1)."""
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    prompt_len = min(prompt_len, c.max_token_len)
    mask = (torch.arange(c.max_token_len) < prompt_len)[None].expand(batch, -1).clone()
    ids = torch.randint(3, c.vocab_size, (batch, c.max_token_len), generator=gen)
    ids[:, 0] = 2
    inputs = {
        "images": torch.rand(batch, num_views, 3, c.image_size, c.image_size, generator=gen) * 2 - 1,
        "image_masks": torch.ones(batch, num_views, dtype=torch.bool),
        "token_ids": ids * mask,
        "token_mask": mask,
        "noise": torch.randn(batch, chunk, c.action_dim, generator=gen),
    }
    if "state" in model.get_buffer_shapes(num_views, chunk):
        inputs["state"] = torch.randn(batch, c.action_dim, generator=gen)
    return inputs


def verify_onnx_stages(
    model: "str | Pi0Model" = "pi0",
    weights: Mapping[str, torch.Tensor] | None = None,
    *,
    size: str = "tiny",
    checkpoint: "str | Path | None" = None,
    num_views: int = 2,
    batch: int = 1,
    prompt_len: int = 20,
    seed: int = 0,
    dtype: "str | torch.dtype" = "float32",
    export_batch: str = DEFAULT_BATCH,
    opset: int = 20,
    decoder: str = "unrolled",
    simplify: bool = False,
    cache_dir: "str | Path | None" = None,
    repeats: int = 3,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """ONNX Runtime (CPU, export ``dtype``) vs PyTorch fp32, per stage; one dict per row of :data:`ROWS`.

    The model is ``model`` with ``weights`` (a :class:`Pi0Model` and canonical weights), or the checkpoint
    at ``checkpoint``, or random weights (seed ``seed``) of the ``"tiny"`` / ``"real"`` configuration of
    ``model`` (``"pi0"``/``"pi05"``). The stages are exported with ``export_batch``, ``opset``,
    ``decoder``, ``simplify`` into the export cache (``cache_dir``; a cache hit skips the export) and
    run at ``batch``; inputs are drawn with seed ``seed + 1``.

    Row keys: ``name``, ``output``, ``shape``, ``batch``, ``max_abs``, ``rel_l2``, ``ref_norm``,
    ``threshold``, ``status`` (``ok``/``over``), ``reference_ms``, ``backend_ms``, ``exported`` (whether
    this call exported, False on a cache hit). In ``step`` mode the decoder row times the host loop."""
    from cortexflow.backends.onnx_backend import OnnxBackend

    log = log or (lambda _message: None)
    export_dtype = parse_export_dtype(dtype)
    threshold = STAGE_THRESHOLDS[export_dtype]
    model, drawn = _resolve_model(model, weights, size, checkpoint, seed)
    checked = {n: t.to(model.weight_dtype(n, export_dtype)) for n, t in drawn.items()}
    reference = {n: t.float() for n, t in checked.items()}
    chunk = model.config.chunk_size
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    backend = OnnxBackend(torch.device("cpu"), export_dtype, cache_dir=cache_dir, batch=export_batch, opset=opset,
                          decoder=decoder, simplify=simplify, provider="cpu", threads=threads)
    if not backend.settings.batch.allows(batch):
        raise ConfigError(f"batch {batch} is outside the export range {backend.settings.batch.describe()}")
    inputs = policy_inputs(model, batch, num_views, chunk, prompt_len, seed + 1)
    log(f"exporting (or loading from the cache) the {model.config.model_type.value} stages ...")
    backend.bundle(model, checked, num_views, chunk)
    exported = backend.exports > 0
    rows = []

    def row(name, output, ref, out, torch_fn, ort_fn):
        max_abs, rel = rel_error(_np(out), _np(ref))
        ref_norm = float(np.linalg.norm(_np(ref).astype(np.float64)))
        rows.append({"name": name, "output": output, "shape": str(tuple(ref.shape)), "batch": batch,
                     "max_abs": max_abs, "rel_l2": rel, "ref_norm": ref_norm, "threshold": threshold,
                     "status": "ok" if rel <= threshold else "over",
                     "reference_ms": _median_ms(torch_fn, repeats), "backend_ms": _median_ms(ort_fn, repeats),
                     "exported": exported, "reason": None})

    dt = export_dtype
    with torch.inference_mode():
        log("checking vision_encoder ...")
        vis_in = {"images": inputs["images"]}
        ref_tokens = model.vision_encoder(ops, reference, vis_in)
        row("vision_encoder", "image_tokens", ref_tokens, backend.vision_encoder(model, checked, vis_in),
            lambda: model.vision_encoder(ops, reference, vis_in), lambda: backend.vision_encoder(model, checked, vis_in))

        log("checking prefix ...")
        masks = {k: inputs[k] for k in ("image_masks", "token_ids", "token_mask")}
        pre_ref_in = {"image_tokens": ref_tokens, **masks}
        pre_ort_in = {"image_tokens": ref_tokens.to(dt), **masks}
        ref_prefix = model.transformer_encoder(ops, reference, pre_ref_in)
        ort_prefix = backend.transformer_encoder(model, checked, pre_ort_in)
        ref_kv = torch.stack([torch.stack([k, v]) for k, v in ref_prefix["kv_cache"]])
        ort_kv = torch.stack([ort_prefix["kv_k"], ort_prefix["kv_v"]], dim=1)
        mask_equal = bool(torch.equal(ref_prefix["prefix_mask"].cpu(), ort_prefix["prefix_mask"].cpu()))
        row("prefix", "kv_cache" if mask_equal else "kv_cache (prefix_mask differs)", ref_kv, ort_kv,
            lambda: model.transformer_encoder(ops, reference, pre_ref_in),
            lambda: backend.transformer_encoder(model, checked, pre_ort_in))
        if not mask_equal:
            rows[-1]["status"] = "over"

        log("checking decoder ...")
        dec_ref_in = {"kv_cache": ref_prefix["kv_cache"], "prefix_mask": ref_prefix["prefix_mask"], "noise": inputs["noise"]}
        if "state" in inputs:
            dec_ref_in["state"] = inputs["state"]
        dec_ort_in = {**dec_ref_in, "kv_cache": [(k.to(dt), v.to(dt)) for k, v in ref_prefix["kv_cache"]]}
        ref_actions = model.transformer_decoder(ops, reference, dec_ref_in)
        row("decoder", "actions", ref_actions, backend.transformer_decoder(model, checked, dec_ort_in),
            lambda: model.transformer_decoder(ops, reference, dec_ref_in),
            lambda: backend.transformer_decoder(model, checked, dec_ort_in))

        log("checking the whole chain ...")

        def chain(be, weights):
            tokens = be.vision_encoder(model, weights, vis_in)
            prefix = be.transformer_encoder(model, weights, {**masks, "image_tokens": tokens})
            return be.transformer_decoder(model, weights, {**dec_ref_in, "kv_cache": prefix["kv_cache"],
                                                          "prefix_mask": prefix["prefix_mask"]})

        eager = _Eager(ops)
        row("actions", "actions (vision -> prefix -> decoder)", ref_actions, chain(backend, checked),
            lambda: chain(eager, reference), lambda: chain(backend, checked))
    return rows


def run_onnx_verify(
    model: str = "pi0",
    *,
    size: str = "tiny",
    dtype: "str | torch.dtype" = "float32",
    seed: int = 0,
    views: int = 2,
    batch: int = 1,
    repeats: int = 3,
    export_batch: str = DEFAULT_BATCH,
    opset: int = 20,
    decoder: str = "unrolled",
    simplify: bool = False,
    cache_dir: "str | Path | None" = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """:func:`verify_onnx_stages` on random weights as a report (the ``cortexflow verify`` JSON layout);
    ``report["passed"]``: every stage within :data:`STAGE_THRESHOLDS`."""
    from cortexflow.onnx._deps import toolchain_versions
    from cortexflow.tools import environment_info, model_config

    if size not in ("tiny", "real"):
        raise ConfigError(f"unknown model size {size!r}; expected tiny or real")
    export_dtype = parse_export_dtype(dtype)
    config = model_config(model, size)
    rows = verify_onnx_stages(model, size=size, num_views=views, batch=batch, seed=seed, dtype=export_dtype,
                              export_batch=export_batch, opset=opset, decoder=decoder, simplify=simplify,
                              cache_dir=cache_dir, repeats=repeats, log=log)
    return {
        "tool": "cortexflow verify",
        "model": config.model_type.value,
        "size": size,
        "backend": "onnx",
        "dtype": dtype_name(export_dtype),
        "reference": {"backend": "pytorch", "dtype": "float32"},
        "threshold_rel_l2": STAGE_THRESHOLDS[export_dtype],
        "seed": seed,
        "export": {"batch": str(export_batch), "opset": opset, "decoder": decoder, "simplify": simplify,
                   "provider": "CPUExecutionProvider"},
        "workload": {"views": views, "batch": batch, "prompt_tokens": min(20, config.max_token_len),
                     "chunk": config.chunk_size, "steps": config.num_diffusion_steps, "repeats": repeats},
        "environment": {**environment_info(torch.device("cpu")), "toolchain": toolchain_versions()},
        "config": config.to_dict(),
        "modules": rows,
        "passed": all(r["status"] == "ok" for r in rows),
    }


def print_onnx_verify(report: dict, console) -> None:
    """The report as a rich table (error, limit and time per stage) and a verdict line."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    e = report["export"]
    title = (f"{report['model']} ({report['size']}): onnx {report['dtype']} (ONNX Runtime CPU, opset {e['opset']}, "
             f"{e['decoder']} decoder, batch {e['batch']}) vs pytorch float32")
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for header, justify in (("stage", "left"), ("output", "left"), ("shape", "left"), ("max |Δ|", "right"),
                            ("‖Δ‖/‖ref‖", "right"), ("limit", "right"), ("status", "left"), ("torch ms", "right"),
                            ("ORT ms", "right")):
        table.add_column(header, justify=justify)
    for row in report["modules"]:
        table.add_row(row["name"], row["output"], row["shape"], f"{row['max_abs']:.3e}", f"{row['rel_l2']:.3e}",
                      f"{row['threshold']:.0e}", Text(row["status"], style="green" if row["status"] == "ok" else "bold red"),
                      f"{row['reference_ms']:.2f}", f"{row['backend_ms']:.2f}")
    console.print(table)
    w = report["workload"]
    exported = any(r["exported"] for r in report["modules"])
    console.print(Text(f"{w['views']} views, batch {w['batch']}, prompt {w['prompt_tokens']} tokens, chunk {w['chunk']}, "
                       f"{w['steps']} steps; each stage gets the reference's output of the stage before; "
                       f"{'exported now' if exported else 'loaded from the export cache'}; times: median of "
                       f"{w['repeats']} runs", style="dim"))
    worst = max(report["modules"], key=lambda r: r["rel_l2"])
    verdict = "PASS" if report["passed"] else "FAIL"
    console.print(Text(f"{verdict}: worst stage {worst['name']} ‖Δ‖/‖ref‖ = {worst['rel_l2']:.3e} "
                       f"({'<=' if report['passed'] else 'limit'} {report['threshold_rel_l2']:.0e})",
                       style="bold green" if report["passed"] else "bold red"))


class _Eager:
    """The PyTorch stages with the backend-stage call signature."""

    def __init__(self, ops):
        self.ops = ops

    def vision_encoder(self, model, weights, inputs):
        return model.vision_encoder(self.ops, weights, inputs)

    def transformer_encoder(self, model, weights, inputs):
        return model.transformer_encoder(self.ops, weights, inputs)

    def transformer_decoder(self, model, weights, inputs):
        return model.transformer_decoder(self.ops, weights, inputs)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _resolve_model(model, weights, size, checkpoint, seed):
    if isinstance(model, Pi0Model):
        if weights is None:
            raise ConfigError("pass the weights with a model instance")
        return model, {n: t.detach().to("cpu", torch.float32) for n, t in weights.items()}
    if checkpoint is not None:
        from cortexflow.checkpoints.loader import load_pi0_checkpoint
        from cortexflow.config import VLAModelType

        loaded = load_pi0_checkpoint(checkpoint, VLAModelType.parse(model), torch.device("cpu"), torch.float32)
        return loaded.model, loaded.weights
    from cortexflow.random_checkpoint import random_weights
    from cortexflow.tools import model_config

    config = model_config(str(model), size)
    instance = model_class(config.model_type)(config)
    return instance, random_weights(config, seed)


__all__ = ["ROWS", "STAGE_THRESHOLDS", "policy_inputs", "print_onnx_verify", "run_onnx_verify", "verify_onnx_stages"]

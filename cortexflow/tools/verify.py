"""``cortexflow verify``: a backend's error against the reference backend, module by module.

Both backends run on the same random weights and the same fresh random inputs. The reference runs in
fp32; the checked backend in its own dtype, on the same weights rounded to that dtype (the reference
gets the rounded values in fp32, so what is measured is the error of the computation, not of rounding
the weights). Each module is fed the reference's output of the module before it, so an error shows
where it arises rather than where it accumulates; the last module, the action chunk, runs the whole
forward on each backend from the images.

Module functions over the ops (patch embedding, one SigLIP layer, the tower, the projector, one prefix
layer) get the backend's prepared weights, or its raw canonical weights when the prepared ones lack a
name the function reads; stages get the prepared weights. A module a backend does not implement
(``NotImplementedError`` / ``BackendUnavailableError``) is reported as ``n/a``; one that raises anything
else as ``error`` with the exception (a failure when it is the action chunk).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from cortexflow.backends import create_backend
from cortexflow.backends.base import ComputeBackend
from cortexflow.config import ModelConfig, dtype_name
from cortexflow.errors import BackendUnavailableError, ConfigError
from cortexflow.families import family_of
from cortexflow.models.gemma import gemma_layer
from cortexflow.models.pi0 import Pi0Model, model_class
from cortexflow.models.siglip import siglip_embed, siglip_layer, siglip_tower
from cortexflow.random_checkpoint import random_weights
from cortexflow.tools import (
    backend_options,
    environment_info,
    model_config,
    resolve_device_dtype,
    resolve_size,
    synchronize,
)

#: ``‖Δ‖/‖ref‖`` allowed on the final actions, by the checked backend's dtype.
THRESHOLDS = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
#: With FP8 weights (``TritonOptions.fp8``): ``‖Δ‖/‖ref‖`` and the cosine similarity the final actions must reach.
FP8_THRESHOLD = 5e-2
FP8_MIN_COSINE = 0.998
PROMPT_LEN = 20
NOT_IMPLEMENTED = (NotImplementedError, BackendUnavailableError)


@dataclass
class Side:
    """One backend with its weights in its dtype: ``raw`` (canonical names) and ``prepared`` by the backend."""

    label: str
    backend: ComputeBackend
    raw: dict[str, torch.Tensor]
    prepared: dict[str, torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype


@dataclass
class Context:
    """The shared model, inputs, and the reference's outputs (memoised) that feed the next modules."""

    model: Pi0Model
    one_step_model: Pi0Model
    buffers: dict[str, torch.Tensor]
    reference: Side
    outputs: dict[str, Any] = field(default_factory=dict)
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def images_flat(self) -> torch.Tensor:
        return self.buffers["images"].flatten(0, 1)

    def reference_output(self, name: str) -> Any:
        """The reference's output of module ``name`` (computed on first use)."""
        if name not in self.outputs:
            self.outputs[name] = _reference_run(MODULES_BY_NAME[name], self)[1]
        return self.outputs[name]

    def prefix_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference's prefix embeddings ``(B, P, D)`` fp32, positions ``(B, P)`` and mask ``(B, P, P)``."""
        if self.prefix is None:
            inputs = self.encoder_inputs(self.reference)
            x, valid = self.model.embed_prefix(self.reference.backend, self.reference.raw, inputs)
            self.prefix = (x, *self.model.prefix_positions_and_mask(valid))
        return self.prefix

    def encoder_inputs(self, side: Side) -> dict[str, torch.Tensor]:
        """``transformer_encoder`` inputs: the reference's image tokens in ``side``'s dtype, masks, token ids."""
        b = self.buffers
        return {
            "image_tokens": self.reference_output("vision_encoder").to(side.dtype),
            "image_masks": b["image_masks"],
            "token_ids": b["token_ids"],
            "token_mask": b["token_mask"],
        }


@dataclass(frozen=True)
class Module:
    """A checked piece of the model: ``build(side, ctx, weights)`` returns the call to compare and time."""

    name: str
    description: str
    build: Callable[[Side, Context, Any], Callable[[], Any]]
    op_level: bool = False
    #: Extra row fields computed from (the backend's output, the reference's), e.g. token agreement.
    extra: Callable[[Any, Any], dict] | None = None


def _patch_embed(side: Side, ctx: Context, w) -> Callable[[], Any]:
    images = ctx.images_flat
    return lambda: siglip_embed(side.backend, w, images)


def _vision_layer(side: Side, ctx: Context, w) -> Callable[[], Any]:
    x = ctx.reference_output("patch_embed").to(side.dtype)
    return lambda: siglip_layer(side.backend, w, 0, x, ctx.config)


def _vision_tower(side: Side, ctx: Context, w) -> Callable[[], Any]:
    images = ctx.images_flat
    return lambda: siglip_tower(side.backend, w, images, ctx.config, side.dtype)


def _projector(side: Side, ctx: Context, w) -> Callable[[], Any]:
    tokens = ctx.reference_output("vision_tower").to(side.dtype)
    return lambda: side.backend.linear(tokens, w["projector.weight"], w["projector.bias"])


def _vision_encoder(side: Side, ctx: Context, w) -> Callable[[], Any]:
    inputs = {"images": ctx.buffers["images"]}
    return lambda: side.backend.vision_encoder(ctx.model, w, inputs)


def _prefix_layer(side: Side, ctx: Context, w) -> Callable[[], Any]:
    x, positions, mask = ctx.prefix_inputs()
    x = x.to(side.dtype)
    return lambda: gemma_layer(side.backend, w, "llm.layers.0", x, positions, mask, ctx.config)[0]


def _prefix(side: Side, ctx: Context, w) -> Callable[[], Any]:
    inputs = ctx.encoder_inputs(side)
    return lambda: side.backend.transformer_encoder(ctx.model, w, inputs)


def _decoder_inputs(side: Side, ctx: Context) -> dict[str, Any]:
    prefix = ctx.reference_output("prefix")
    inputs = {
        "kv_cache": [(k.to(side.dtype), v.to(side.dtype)) for k, v in prefix["kv_cache"]],
        "prefix_mask": prefix["prefix_mask"],
        "noise": ctx.buffers["noise"],
    }
    if "state" in ctx.buffers:
        inputs["state"] = ctx.buffers["state"]
    return inputs


def _denoise_step(side: Side, ctx: Context, w) -> Callable[[], Any]:
    inputs = _decoder_inputs(side, ctx)
    weights = side.backend.prepare_weights(ctx.one_step_model, dict(side.raw))
    return lambda: side.backend.transformer_decoder(ctx.one_step_model, weights, inputs)


def _actions(side: Side, ctx: Context, w) -> Callable[[], Any]:
    buffers = {name: tensor.clone() for name, tensor in ctx.buffers.items()}
    return lambda: ctx.model.forward(side.backend, w, buffers)


MODULES: tuple[Module, ...] = (
    Module("patch_embed", "patch + position embedding (siglip_embed)", _patch_embed, op_level=True),
    Module("vision_layer", "SigLIP layer 0 (siglip_layer)", _vision_layer, op_level=True),
    Module("vision_tower", "SigLIP tower (siglip_tower)", _vision_tower, op_level=True),
    Module("projector", "projector linear", _projector, op_level=True),
    Module("vision_encoder", "vision stage (backend.vision_encoder)", _vision_encoder),
    Module("prefix_layer", "prefix Gemma layer 0 (gemma_layer)", _prefix_layer, op_level=True),
    Module("prefix", "prefix KV cache, all layers (backend.transformer_encoder)", _prefix),
    Module("denoise_step", "one Euler step (backend.transformer_decoder, 1 step)", _denoise_step),
    Module("actions", "action chunk, whole forward (model.forward)", _actions),
)
MODULES_BY_NAME = {m.name: m for m in MODULES}


def comparable(output: Any) -> torch.Tensor:
    """A module's output as one fp32 tensor: the prefix's KV cache is every k and v flattened and joined;
    a token policy's ``{"tokens", "actions"}`` is its actions."""
    if isinstance(output, dict) and "actions" in output:
        return output["actions"].float()
    if isinstance(output, dict):
        return torch.cat([t.float().flatten() for kv in output["kv_cache"] for t in kv])
    return output.float()


def describe_shape(output: Any) -> str:
    if isinstance(output, dict) and "actions" in output:
        return str(tuple(output["actions"].shape))
    if isinstance(output, dict):
        kv = output["kv_cache"]
        return f"{len(kv)}x2x{tuple(kv[0][0].shape)}"
    return str(tuple(output.shape))


def error_stats(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``max |Δ|``, ``‖Δ‖/‖ref‖``, ``‖ref‖`` and the cosine similarity of the flattened tensors (fp64)."""
    ref = reference.double()
    out = output.double()
    delta = out - ref
    ref_norm = ref.norm().item()
    norms = ref_norm * out.norm().item()
    return {
        "max_abs": delta.abs().max().item(),
        "rel_l2": delta.norm().item() / ref_norm if ref_norm > 0 else math.inf,
        "ref_norm": ref_norm,
        "cosine": (out.flatten() @ ref.flatten()).item() / norms if norms > 0 else math.nan,
    }


@dataclass(frozen=True)
class Fp8Check:
    """How a backend holding FP8 weights is judged: the final actions' ``threshold`` and ``min_cosine`` against
    the fp32 reference, and ``baseline``, the same backend without FP8 (in bf16), that every module is also
    compared with (the row's ``vs_bf16``), so the error each FP8 stage adds is seen apart from bf16's."""

    threshold: float
    min_cosine: float
    baseline: ComputeBackend


def fp8_check(checked: ComputeBackend, device: torch.device, dtype: torch.dtype) -> Fp8Check | None:
    """The :class:`Fp8Check` for ``checked`` when its options hold FP8 stages, else None."""
    options = getattr(checked, "options", None)
    if getattr(options, "fp8", "off") == "off":
        return None
    without = type(checked).configured(options, fp8="off")
    return Fp8Check(FP8_THRESHOLD, FP8_MIN_COSINE, create_backend(without, device, dtype))


def fp8_sides(fp8: Fp8Check | None, model: Any, raw: dict[str, torch.Tensor]) -> tuple[Fp8Check, "Side"] | None:
    """``(fp8, the bf16 baseline side)`` for :func:`_check_module`: the baseline backend's weights prepared from the
    checked side's ``raw`` weights (None without FP8 stages)."""
    if fp8 is None:
        return None
    return fp8, Side("bf16", fp8.baseline, raw, fp8.baseline.prepare_weights(model, dict(raw)))


def holds_fp8(weights: dict[str, torch.Tensor]) -> bool:
    from cortexflow.quantization.fp8 import is_fp8

    return any(is_fp8(t) for t in weights.values())


def median_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, synchronising the GPU before and after each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _first_run(module: Module, side: Side, ctx: Context) -> tuple[Callable[[], Any], Any, str]:
    """Build and run ``module`` once on ``side``: (call, output, which weights it used)."""
    if not module.op_level:
        fn = module.build(side, ctx, side.prepared)
        return fn, fn(), "prepared"
    if holds_fp8(side.prepared):
        fn = module.build(side, ctx, side.raw)
        return fn, fn(), "raw (single ops take no FP8 weights; the fused stages below run them)"
    try:
        fn = module.build(side, ctx, side.prepared)
        return fn, fn(), "prepared"
    except KeyError as err:
        missing = err.args[0] if err.args else None
        if missing in side.prepared or missing not in side.raw:
            raise
        fn = module.build(side, ctx, side.raw)
        return fn, fn(), f"raw (prepared weights lack {missing})"


def _reference_run(module: Module, ctx: Context) -> tuple[Callable[[], Any], Any, str]:
    """``_first_run`` on the reference, which must implement every module."""
    try:
        return _first_run(module, ctx.reference, ctx)
    except NOT_IMPLEMENTED as err:
        raise BackendUnavailableError(
            f"reference backend {ctx.reference.backend.name!r} cannot compute {module.name}: {err}"
        ) from err


@contextlib.contextmanager
def exact_fp32():
    """Turn off TF32 in matmuls and convolutions (the reference must be real fp32), restoring it after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_inputs(model: Pi0Model, views: int, prompt_len: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random non-zero buffers for one call: images in [-1, 1], ``prompt_len`` valid token ids (BOS first),
    state and noise ~ N(0, 1); every view present. ``actions`` is the output buffer (zeros)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shapes = model.get_buffer_shapes(views, config.chunk_size)
    ids = torch.randint(3, config.vocab_size, shapes["token_ids"], generator=generator)
    ids[:, 0] = 2
    mask = torch.zeros(shapes["token_mask"], dtype=torch.bool)
    mask[:, :prompt_len] = True
    buffers = {
        "images": torch.rand(shapes["images"], generator=generator) * 2 - 1,
        "image_masks": torch.ones(shapes["image_masks"], dtype=torch.bool),
        "token_ids": ids * mask,
        "token_mask": mask,
        "noise": torch.randn(shapes["noise"], generator=generator),
        "actions": torch.zeros(shapes["actions"]),
    }
    if "state" in shapes:
        buffers["state"] = torch.randn(shapes["state"], generator=generator)
    return {name: tensor.to(device) for name, tensor in buffers.items()}


def split_weights(model: Pi0Model, drawn: dict[str, torch.Tensor], dtype: torch.dtype):
    """Drawn fp32 weights -> (the checked backend's, in their run-time dtypes; the reference's, the same values in fp32).

    Empties ``drawn`` as it goes so that the real-size model is never held three times."""
    checked, reference = {}, {}
    for name in list(drawn):
        tensor = drawn.pop(name)
        checked[name] = tensor.to(model.weight_dtype(name, dtype))
        reference[name] = checked[name] if checked[name].dtype == torch.float32 else checked[name].float()
    return checked, reference


def run_verify(
    model: str = "pi0",
    backend: "str | ComputeBackend | type[ComputeBackend]" = "pytorch",
    against: str = "pytorch",
    size: str = "auto",
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    seed: int = 0,
    views: int = 2,
    repeats: int = 3,
    modules: Iterable[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Compare ``backend`` (in ``dtype``) with ``against`` (fp32) module by module; returns the report dict.

    ``modules`` selects some of the family's modules by name (default: all). ``report["passed"]`` says whether
    the final actions are within :data:`THRESHOLDS` of the reference. The model's family
    (:mod:`cortexflow.families`) supplies the check: :func:`run_flow_verify` for pi0 / pi05,
    :func:`cortexflow.tools.decoding_verify.run_token_verify` for openvla / rt2 (its own modules; ``views``
    ignored), :func:`cortexflow.tools.history_verify.run_rt1_verify` for rt1."""
    verify = family_of(model).part("verify")
    return verify(model=model, backend=backend, against=against, size=size, device=device, dtype=dtype, seed=seed,
                  views=views, repeats=repeats, modules=modules, log=log)


def run_flow_verify(*, model: str, backend: Any, against: str, size: str, device: str, dtype: Any, seed: int,
                    views: int, repeats: int, modules: Iterable[str] | None, log: Callable[[str], None] | None) -> dict:
    """:func:`run_verify` (whose arguments these are) for a flow-matching policy: :data:`MODULES` one by one."""
    resolved_device, compute_dtype = resolve_device_dtype(device, dtype)
    size = resolve_size(size, resolved_device)
    selected = [m.name for m in MODULES] if modules is None else list(modules)
    unknown = sorted(set(selected) - set(MODULES_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown verify module(s) {unknown}; known: {', '.join(MODULES_BY_NAME)}")
    if views < 1 or repeats < 1:
        raise ConfigError(f"views and repeats must be at least 1, got {views} and {repeats}")
    log = log or (lambda _message: None)
    config = model_config(model, size)
    pi_model = model_class(config.model_type)(config)
    threshold = THRESHOLDS[compute_dtype]
    checked_backend = create_backend(backend, resolved_device, compute_dtype)
    reference_backend = create_backend(against, resolved_device, torch.float32)
    fp8 = fp8_check(checked_backend, resolved_device, compute_dtype)
    if fp8 is not None:
        threshold = fp8.threshold
    prompt_len = min(PROMPT_LEN, config.max_token_len)
    log(f"drawing {size} {config.model_type.value} weights on {resolved_device} ...")
    checked_raw, reference_raw = split_weights(
        pi_model, random_weights(config, seed, torch.float32, resolved_device), compute_dtype
    )
    rows = []
    with torch.inference_mode(), exact_fp32():
        reference = Side("reference", reference_backend, reference_raw,
                         reference_backend.prepare_weights(pi_model, dict(reference_raw)))
        checked = Side("backend", checked_backend, checked_raw,
                       checked_backend.prepare_weights(pi_model, dict(checked_raw)))
        baseline = fp8_sides(fp8, pi_model, checked_raw)
        ctx = Context(
            model=pi_model,
            one_step_model=model_class(config.model_type)(config.replace(num_diffusion_steps=1)),
            buffers=random_inputs(pi_model, views, prompt_len, seed + 1, resolved_device),
            reference=reference,
        )
        for index, name in enumerate(selected, 1):
            log(f"checking {name} ({index}/{len(selected)}) ...")
            start = time.perf_counter()
            rows.append(_check_module(MODULES_BY_NAME[name], ctx, checked, threshold, repeats, resolved_device,
                                      baseline))
            log(f"{name}: {rows[-1]['status']} in {time.perf_counter() - start:.1f} s")
    actions = next((r for r in rows if r["name"] == "actions"), None)
    workload = {"views": views, "prompt_tokens": prompt_len, "chunk": config.chunk_size,
                "steps": config.num_diffusion_steps, "repeats": repeats}
    return verify_report(config.model_type.value, size, checked_backend, reference_backend, compute_dtype, threshold,
                         seed, workload, resolved_device, config, rows, actions is not None and actions["status"] == "ok",
                         fp8=fp8)


def verify_report(model: str, size: str, checked: ComputeBackend, reference: ComputeBackend, dtype: torch.dtype,
                  threshold: float, seed: int, workload: dict, device: torch.device, config: Any, rows: list[dict],
                  passed: bool, notes: list[str] | None = None, failure: Any = ..., fp8: Fp8Check | None = None) -> dict:
    """The report every family's verify returns: what was compared (backends, dtypes, threshold, workload,
    machine, model config), the module rows and whether the final actions passed; ``notes`` and ``failure``
    (what failed beyond the actions) where the family gives them."""
    report = {
        "tool": "cortexflow verify",
        "model": model,
        "size": size,
        "backend": checked.name,
        "backend_options": backend_options(checked),
        "dtype": dtype_name(dtype),
        "reference": {"backend": reference.name, "dtype": "float32"},
        "threshold_rel_l2": threshold,
        "seed": seed,
        "fp8": None if fp8 is None else {"stages": checked.options.fp8, "min_cosine": fp8.min_cosine,
                                         "baseline": "the same backend without FP8, " + dtype_name(dtype)},
        "workload": workload,
    }
    if notes is not None:
        report["notes"] = notes
    report.update(environment=environment_info(device), config=config.to_dict(), modules=rows, passed=passed)
    if failure is not ...:
        report["failure"] = failure
    return report


def _check_module(module: Module, ctx: Context, checked: Side, threshold: float, repeats: int,
                  device: torch.device, fp8: tuple[Fp8Check, Side] | None = None) -> dict:
    """One module's row: the checked backend against the reference (and, with ``fp8``, against the bf16
    baseline side too, and the cosine limit applied)."""
    ref_fn, ref_out, _ = _reference_run(module, ctx)
    ctx.outputs.setdefault(module.name, ref_out)
    row = {"name": module.name, "description": module.description, "shape": describe_shape(ref_out),
           "threshold": threshold, "reference_ms": median_ms(ref_fn, repeats, device)}
    try:
        fn, out, weights = _first_run(module, checked, ctx)
    except Exception as err:  # noqa: BLE001 - the checked backend's failure is a result, not a crash
        status = "n/a" if isinstance(err, NOT_IMPLEMENTED) else "error"
        return {**row, "status": status, "reason": f"{type(err).__name__}: {' '.join(str(err).split())}",
                "backend_ms": None, "max_abs": None, "rel_l2": None, "ref_norm": None, "weights": None}
    row.update(backend_ms=median_ms(fn, repeats, device), weights=weights, reason=None)
    got, want = comparable(out), comparable(ref_out)
    if got.shape != want.shape:
        return {**row, "status": "mismatch", "reason": f"output shape {describe_shape(out)} != {row['shape']}",
                "max_abs": None, "rel_l2": None, "ref_norm": None}
    stats = error_stats(got, want)
    extra = module.extra(out, ref_out) if module.extra is not None else {}
    within = stats["rel_l2"] <= threshold
    if fp8 is not None:
        check, baseline = fp8
        within = within and stats["cosine"] >= check.min_cosine
        try:
            _, base_out, _ = _first_run(module, baseline, ctx)
            extra["vs_bf16"] = error_stats(got, comparable(base_out))
        except Exception as err:  # noqa: BLE001 - a missing baseline row is reported, the check goes on
            extra["vs_bf16"] = {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    return {**row, **stats, **extra, "status": "ok" if within else "over"}


def print_verify(report: dict, console) -> None:
    """The report as a rich table (error, threshold and time per module) and a verdict line."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    ref = report["reference"]
    title = (f"{report['model']} ({report['size']}) on {report['environment']['device']}: "
             f"{report['backend']} {report['dtype']} vs {ref['backend']} {ref['dtype']}")
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    fp8 = report.get("fp8")
    headers = [("module", "left"), ("output", "left"), ("max |Δ|", "right"), ("‖Δ‖/‖ref‖", "right")]
    if fp8:
        headers += [("cosine", "right"), ("vs bf16 ‖Δ‖/‖ref‖", "right")]
    headers += [("limit", "right"), ("status", "left"), ("ref ms", "right"), ("backend ms", "right")]
    for header, justify in headers:
        table.add_column(header, justify=justify)
    styles = {"ok": "green", "over": "yellow", "n/a": "dim", "mismatch": "red", "error": "red", "tie": "yellow"}
    for row in report["modules"]:
        number = lambda key: "-" if row.get(key) is None else f"{row[key]:.3e}"  # noqa: E731
        ms = lambda key: "-" if row.get(key) is None else f"{row[key]:.2f}"  # noqa: E731
        status = row["status"]
        if row["name"] == "actions" and status not in ("ok", "tie"):
            status = "FAIL" if status == "over" else f"FAIL ({status})"
        cells = [row["name"], row["shape"], number("max_abs"), number("rel_l2")]
        if fp8:
            vs = row.get("vs_bf16") or {}
            cells += ["-" if row.get("cosine") is None else f"{row['cosine']:.5f}",
                      f"{vs['rel_l2']:.3e}" if "rel_l2" in vs else "-"]
        cells += [f"{row['threshold']:.0e}", Text(status, style="bold red" if status.startswith("FAIL") else styles.get(status)),
                  ms("reference_ms"), ms("backend_ms")]
        table.add_row(*cells)
    console.print(table)
    for row in report["modules"]:
        if row.get("reason"):
            console.print(Text(f"{row['name']}: {row['reason'][:400]}", style="dim"))
        elif row.get("weights", "prepared") not in (None, "prepared"):
            console.print(Text(f"{row['name']}: ran on {row['weights']}", style="dim"))
        if row.get("tokens_agree") is not None:
            console.print(Text(f"{row['name']}: {row['tokens_agree']}/{row['tokens_total']} greedy tokens agree "
                               f"({row['token_note']})", style="dim"))
    w = report["workload"]
    if "summary" in w:
        what = w["summary"]
    elif "generated_tokens" in w:
        what = (f"1 image, prompt {w['prompt_tokens']} ids, {w['generated_tokens']} greedy action tokens"
                f"{' (constrained to the action ids)' if w['constrained'] else ''}")
    else:
        what = f"{w['views']} views, prompt {w['prompt_tokens']} tokens, chunk {w['chunk']}, {w['steps']} steps"
    console.print(Text(f"{what}; times: median of {w['repeats']} runs; the limit applies to the final actions",
                       style="dim"))
    for note in report.get("notes", ()):
        console.print(Text(note, style="dim"))
    if fp8:
        console.print(Text(f"FP8 stages {fp8['stages']}: every module is also compared with {fp8['baseline']} "
                           f"(vs bf16); the final actions must also reach cosine >= {fp8['min_cosine']}", style="dim"))
    actions = next((r for r in report["modules"] if r["name"] == "actions"), None)
    if actions is None:
        return
    if not report["passed"] and report.get("failure"):
        console.print(Text(f"FAIL: {report['failure']}", style="bold red"))
    elif report["passed"] and actions["status"] == "tie":
        console.print(Text(f"PASS: final actions ‖Δ‖/‖ref‖ = {actions['rel_l2']:.3e} > {actions['threshold']:.0e}, but "
                           f"only through a near-tie: {actions['reason']}", style="bold green"))
    elif report["passed"]:
        console.print(Text(f"PASS: final actions ‖Δ‖/‖ref‖ = {actions['rel_l2']:.3e} <= {actions['threshold']:.0e}",
                           style="bold green"))
    elif actions["rel_l2"] is None:
        console.print(Text(f"FAIL: final actions not computed ({actions['reason'][:400]})", style="bold red"))
    else:
        console.print(Text(f"FAIL: final actions ‖Δ‖/‖ref‖ = {actions['rel_l2']:.3e} > {actions['threshold']:.0e}",
                           style="bold red"))


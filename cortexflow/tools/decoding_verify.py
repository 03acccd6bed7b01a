"""``cortexflow verify --model openvla|rt2``: a backend's error on a token-decoding policy, module by module.

The same method and report as :mod:`cortexflow.tools.verify` (whose row, timing and table helpers this
uses): both backends on the same random non-zero weights (the reference in fp32 on the checked
backend's rounded values), one random 224x224 uint8 image through the model's own preprocessing and a
random prompt of :data:`~cortexflow.tools.verify.PROMPT_LEN` ids (BOS first, no action ids, the model's
closing id last); each module fed the reference's output of the module before it.

Modules (OpenVLA): the DINOv2 tower, the SigLIP tower (each read after its second-to-last block), the
3-layer GELU projector on the fused features, the whole vision stage, Llama layer 0 on the prefill
sequence, the prefill logits (all layers, final norm, LM head at the last prompt position), the decode
logits (teacher-forced: the prefill and every cached single-token step fed the reference's tokens, so
each step is compared on the same inputs), and ``actions``: the whole greedy generation (bucket-padded
prompt, KV cache; decoding constrained to the action ids, so that every token is one action bin) with
its tokens and de-tokenised actions. RT-2: the SigLIP patch embedding, SigLIP layer 0, the tower, the
projector, the vision stage, Gemma layer 0, then the same prefill / decode / actions modules.

Pass rule: the final actions within :data:`~cortexflow.tools.verify.THRESHOLDS` of the reference, as for
Pi0, and (when checked) the teacher-forced decode logits too, so that an error that happens not to flip
a token still fails. In bfloat16 / float16 a greedy token may flip where the reference's two best logits are closer
than the rounding error, after which generation diverges; the actions row is then ``tie`` and passes
when the teacher-forced decode logits are within the limit. In float32 every token must agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from cortexflow.backends import create_backend
from cortexflow.config import VLAModelType
from cortexflow.decoding_engine import DEFAULT_BUCKET, TokenVLAEngine
from cortexflow.errors import ConfigError
from cortexflow.models.vit import gelu, vit_features
from cortexflow.tools import (
    random_prompt_ids,
    random_token_weights,
    resolve_device_dtype,
    resolve_size,
    token_model,
)
from cortexflow.tools.verify import (
    PROMPT_LEN,
    THRESHOLDS,
    Module,
    Side,
    _check_module,
    fp8_check,
    fp8_sides,
    _patch_embed,
    _projector,
    _reference_run,
    _vision_encoder,
    _vision_layer,
    _vision_tower,
    exact_fp32,
    split_weights,
    verify_report,
)


@dataclass
class TokenContext:
    """The model, the inputs and the reference's memoised outputs (the duck type of ``verify.Context``).

    ``buffers["images"]`` is the preprocessed image ``(1, C, S, S)`` fp32; ``ids`` the prompt ``(1, n)``."""

    model: Any
    modules: dict[str, Module]
    buffers: dict[str, torch.Tensor]
    ids: torch.Tensor
    reference: Side
    outputs: dict[str, Any] = field(default_factory=dict)
    sequence: torch.Tensor | None = None

    @property
    def config(self):
        """The SigLIP / Gemma ``ModelConfig`` for RT-2 (what the shared SigLIP modules read); else the config."""
        return getattr(self.model.config, "paligemma", self.model.config)

    @property
    def images_flat(self) -> torch.Tensor:
        return self.buffers["images"]

    def reference_output(self, name: str) -> Any:
        """The reference's output of module ``name`` (computed on first use)."""
        if name not in self.outputs:
            self.outputs[name] = _reference_run(self.modules[name], self)[1]
        return self.outputs[name]

    def prefill_sequence(self) -> torch.Tensor:
        """The reference's prefill embeddings ``(1, P, D)`` fp32: its image tokens and the prompt."""
        if self.sequence is None:
            ref = self.reference
            image_tokens = self.reference_output("vision_encoder")
            self.sequence = self.model.embed_sequence(ref.backend, ref.prepared, image_tokens, self.ids)
        return self.sequence


# ---- computations over a backend's ops ------------------------------------------------------------
def _scratch_cache(model, length: int, dtype: torch.dtype, device: torch.device):
    d = model.lm.dims
    shape = (d.num_layers, 1, length, d.num_kv_heads, d.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def _logits(model, ops, w, h: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head of ``h (1, 1, D)`` -> fp32 logits over the whole vocabulary ``(1, V)``."""
    lm = model.lm
    h = lm.norm(ops, w, f"{lm.prefix}.norm", h)
    return ops.linear(h[:, 0], lm.lm_head(w)).float()


def prefill_logits(model, ops, w, x: torch.Tensor, cache) -> torch.Tensor:
    """Every layer over the prefill embeddings ``x (1, P, D)`` (positions ``0..P-1``, the model's prefill
    mask, K/V into ``cache``), then the logits at the last position ``(1, V)`` fp32."""
    length = x.shape[1]
    positions = torch.arange(length, device=x.device)[None]
    mask = model.prefill_mask(length, torch.tensor([length], device=x.device), x.device)
    for i in range(model.lm.dims.num_layers):
        x = ops.decoder_lm_layer(model.lm, w, i, x, positions, mask, cache, None)
    return _logits(model, ops, w, x[:, -1:])


def teacher_forced_logits(model, ops, w, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``(T, V)`` fp32 of every generated position: the prefill of ``x (1, P, D)``, then the cached
    single-token steps fed ``tokens (T,)`` (token ``s`` at position ``P + s``), as ``DecoderLM.step`` runs."""
    lm, length, count = model.lm, x.shape[1], tokens.shape[0]
    cache = _scratch_cache(model, length + count, x.dtype, x.device)
    rows = [prefill_logits(model, ops, w, x, cache)]
    visible = torch.arange(length + count, device=x.device)
    for s in range(count - 1):
        position = torch.tensor([length + s], device=x.device)
        h = lm.embed(ops, w, tokens[s].view(1, 1))
        mask = (visible <= position)[None, None, :]
        for i in range(lm.dims.num_layers):
            h = ops.decoder_lm_layer(lm, w, i, h, position[None], mask, cache, position)
        rows.append(_logits(model, ops, w, h))
    return torch.cat(rows, dim=0)


# ---- module builders --------------------------------------------------------------------------------
def _vit_tower(which: str) -> Callable:
    def build(side: Side, ctx: TokenContext, w) -> Callable[[], Any]:
        spec = ctx.model.config.dino_spec() if which == "dino" else ctx.model.config.siglip_spec()
        images = ctx.buffers["images"][:, :3] if which == "dino" else ctx.buffers["images"][:, 3:]
        return lambda: vit_features(side.backend, w, spec, images, side.dtype)
    return build


def _fused_projector(side: Side, ctx: TokenContext, w) -> Callable[[], Any]:
    """OpenVLA's ``fc1 -> GELU -> fc2 -> GELU -> fc3`` on the reference's concatenated tower features."""
    fused = torch.cat([ctx.reference_output("dino_tower"), ctx.reference_output("siglip_tower")], dim=-1).to(side.dtype)
    ops = side.backend

    def run():
        x = gelu(ops, ops.linear(fused, w["projector.fc1.weight"], w["projector.fc1.bias"]))
        x = gelu(ops, ops.linear(x, w["projector.fc2.weight"], w["projector.fc2.bias"]))
        return ops.linear(x, w["projector.fc3.weight"], w["projector.fc3.bias"])
    return run


def _llm_layer(side: Side, ctx: TokenContext, w) -> Callable[[], Any]:
    model = ctx.model
    x = ctx.prefill_sequence().to(side.dtype)
    length = x.shape[1]
    positions = torch.arange(length, device=x.device)[None]
    mask = model.prefill_mask(length, torch.tensor([length], device=x.device), x.device)
    cache = _scratch_cache(model, length, side.dtype, x.device)
    return lambda: side.backend.decoder_lm_layer(model.lm, w, 0, x, positions, mask, cache, None)


def _prefill_logits(side: Side, ctx: TokenContext, w) -> Callable[[], Any]:
    image_tokens = ctx.reference_output("vision_encoder").to(side.dtype)
    model = ctx.model

    def run():
        x = model.embed_sequence(side.backend, w, image_tokens, ctx.ids)
        return prefill_logits(model, side.backend, w, x, _scratch_cache(model, x.shape[1], side.dtype, x.device))
    return run


def _decode_logits(side: Side, ctx: TokenContext, w) -> Callable[[], Any]:
    image_tokens = ctx.reference_output("vision_encoder").to(side.dtype)
    tokens = ctx.reference_output("actions")["tokens"].to(image_tokens.device)  # a CPU tensor (numpy tokens)
    model = ctx.model

    def run():
        x = model.embed_sequence(side.backend, w, image_tokens, ctx.ids)
        return teacher_forced_logits(model, side.backend, w, x, tokens)
    return run


def _actions(side: Side, ctx: TokenContext, w) -> Callable[[], Any]:
    """The engine's whole greedy generation (eager, constrained) -> ``{"tokens": (T,), "actions": ...}``."""
    model = ctx.model
    engine = TokenVLAEngine(model, side.raw, backend=side.backend, device=side.backend.device, dtype=side.dtype,
                            use_cuda_graphs=False, constrained=True)
    pixels = ctx.buffers["images"][0]
    ids = ctx.ids[0].tolist()

    def run():
        tokens = engine.generate(pixels, ids)
        return {"tokens": torch.from_numpy(tokens.copy()),
                "actions": torch.from_numpy(np.asarray(model.tokens_to_actions(tokens), dtype=np.float32))}
    return run


# ---- extra row fields -------------------------------------------------------------------------------
def _top_token(allowed: tuple[int, int]) -> Callable[[Any, Any], dict]:
    def extra(out: torch.Tensor, ref: torch.Tensor) -> dict:
        lo, hi = allowed
        got, want = out[:, lo:hi].argmax(-1) + lo, ref[:, lo:hi].argmax(-1) + lo
        return {"tokens_agree": int((got == want).sum()), "tokens_total": int(want.numel()),
                "token_note": "argmax over the action ids"}
    return extra


def _teacher_forced_agreement(allowed: tuple[int, int]) -> Callable[[Any, Any], dict]:
    def extra(out: torch.Tensor, ref: torch.Tensor) -> dict:
        row = _top_token(allowed)(out, ref)
        return {**row, "token_note": "teacher-forced argmax over the action ids, each step on the reference's tokens"}
    return extra


def _token_agreement(out: dict, ref: dict) -> dict:
    got, want = out["tokens"].tolist(), ref["tokens"].tolist()
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    return {"tokens_agree": sum(a == b for a, b in zip(got, want)), "tokens_total": len(want),
            "tokens": got, "reference_tokens": want, "first_token_mismatch": first,
            "token_note": "free-running greedy generation" + ("" if first is None else f"; first differs at {first}")}


def token_modules(model) -> tuple[Module, ...]:
    """The checked modules of ``model`` (an ``OpenVLAModel`` or ``RT2Model``), in order."""
    allowed = model.action_id_range
    tail = (
        Module("vision_encoder", "vision stage (backend.vision_encoder)", _vision_encoder),
        Module("llm_layer", f"{'Llama' if model.model_type == VLAModelType.OPENVLA else 'Gemma'} layer 0 on the "
               "prefill sequence (lm.layer)", _llm_layer, op_level=True),
        Module("prefill_logits", "prefill, all layers -> logits at the last prompt position", _prefill_logits,
               op_level=True, extra=_top_token(allowed)),
        Module("decode_logits", "prefill + cached steps fed the reference's tokens -> logits per token",
               _decode_logits, op_level=True, extra=_teacher_forced_agreement(allowed)),
        Module("actions", "greedy action tokens -> actions, whole generation (engine)", _actions,
               extra=_token_agreement),
    )
    if model.model_type == VLAModelType.OPENVLA:
        head = (
            Module("dino_tower", "DINOv2 tower to block L-2 (vit_features)", _vit_tower("dino"), op_level=True),
            Module("siglip_tower", "SigLIP tower to block L-2 (vit_features)", _vit_tower("siglip"), op_level=True),
            Module("projector", "fused-feature projector fc1-GELU-fc2-GELU-fc3", _fused_projector, op_level=True),
        )
    else:
        head = (
            Module("patch_embed", "patch + position embedding (siglip_embed)", _patch_embed, op_level=True),
            Module("vision_layer", "SigLIP layer 0 (siglip_layer)", _vision_layer, op_level=True),
            Module("vision_tower", "SigLIP tower (siglip_tower)", _vision_tower, op_level=True),
            Module("projector", "projector linear", _projector, op_level=True),
        )
    return head + tail


def random_image_inputs(model, seed: int, device: torch.device) -> torch.Tensor:
    """A random RGB uint8 image of the model's input size through the model's own preprocessing -> ``(1, C, S, S)`` fp32."""
    size = getattr(model.config, "paligemma", model.config).image_size
    image = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return model.prepare_image(image)[None].to(device)


def run_token_verify(
    model: str = "openvla",
    backend: Any = "pytorch",
    against: str = "pytorch",
    size: str = "auto",
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    seed: int = 0,
    repeats: int = 3,
    modules: Iterable[str] | None = None,
    log: Callable[[str], None] | None = None,
    overrides: Mapping[str, Any] | None = None,
    views: int | None = None,
) -> dict:
    """Compare ``backend`` (in ``dtype``) with ``against`` (fp32) on OpenVLA or RT-2, module by module
    (``views`` does not apply: the models take one image).

    Returns the report dict of :func:`cortexflow.tools.verify.run_verify` (same keys; the workload
    describes one image, the prompt in ids and the generated tokens). ``overrides`` changes fields of the
    model configuration (e.g. ``image_size=56`` for fewer image tokens under the Triton interpreter)."""
    resolved_device, compute_dtype = resolve_device_dtype(device, dtype)
    size = resolve_size(size, resolved_device)
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    log = log or (lambda _message: None)
    policy = token_model(model, size, **dict(overrides or {}))
    policy.config.validate()
    table = {m.name: m for m in token_modules(policy)}
    selected = list(table) if modules is None else list(modules)
    unknown = sorted(set(selected) - set(table))
    if unknown:
        raise ConfigError(f"unknown verify module(s) {unknown} for {policy.model_type.value}; known: {', '.join(table)}")
    threshold = THRESHOLDS[compute_dtype]
    checked_backend = create_backend(backend, resolved_device, compute_dtype)
    reference_backend = create_backend(against, resolved_device, torch.float32)
    fp8 = fp8_check(checked_backend, resolved_device, compute_dtype)
    if fp8 is not None:
        threshold = fp8.threshold
    log(f"drawing {size} {policy.model_type.value} weights on {resolved_device} ...")
    checked_raw, reference_raw = split_weights(
        policy, random_token_weights(policy, seed, torch.float32, resolved_device), compute_dtype)
    checked_raw, reference_raw = policy.prepare_weights(checked_raw), policy.prepare_weights(reference_raw)
    ids = random_prompt_ids(policy, PROMPT_LEN, np.random.default_rng(seed + 1))
    rows = []
    with torch.inference_mode(), exact_fp32():
        reference = Side("reference", reference_backend, reference_raw,
                         reference_backend.prepare_weights(policy, dict(reference_raw)))
        checked = Side("backend", checked_backend, checked_raw,
                       checked_backend.prepare_weights(policy, dict(checked_raw)))
        baseline = fp8_sides(fp8, policy, checked_raw)
        ctx = TokenContext(model=policy, modules=table,
                           buffers={"images": random_image_inputs(policy, seed + 1, resolved_device)},
                           ids=torch.tensor([ids], dtype=torch.int64, device=resolved_device), reference=reference)
        for index, name in enumerate(selected, 1):
            log(f"checking {name} ({index}/{len(selected)}) ...")
            start = time.perf_counter()
            rows.append(_check_module(table[name], ctx, checked, threshold, repeats, resolved_device, baseline))
            log(f"{name}: {rows[-1]['status']} in {time.perf_counter() - start:.1f} s")
    by_name = {row["name"]: row for row in rows}
    actions, decode = by_name.get("actions"), by_name.get("decode_logits")
    if (actions is not None and actions["status"] == "over" and compute_dtype != torch.float32
            and decode is not None and decode["status"] == "ok"):
        actions["status"] = "tie"
        actions["reason"] = (f"greedy decoding diverged at token {actions['first_token_mismatch']}, where the reference's "
                             f"best logits are closer than the rounding error; teacher-forced decode logits "
                             f"‖Δ‖/‖ref‖ = {decode['rel_l2']:.3e} <= {threshold:.0e}")
    passed = actions is not None and actions["status"] in ("ok", "tie")
    failure = None
    if passed and decode is not None and decode["status"] != "ok":
        passed = False
        failure = (f"decode logits ‖Δ‖/‖ref‖ = {decode['rel_l2']:.3e} > {threshold:.0e}" if decode["rel_l2"] is not None
                   else f"decode logits not computed ({decode['reason']})")
        failure += f" (the final actions agree: {actions['tokens_agree']}/{actions['tokens_total']} tokens)"
    padded = min(-(-len(ids) // DEFAULT_BUCKET) * DEFAULT_BUCKET, policy.config.max_text_tokens)
    workload = {"views": 1, "prompt_tokens": len(ids), "padded_prompt_tokens": padded,
                "chunk": getattr(policy.config, "chunk_size", 1), "steps": None,
                "generated_tokens": policy.num_generated_tokens, "constrained": True, "repeats": repeats}
    notes = [f"{policy.model_type.value}: one image and greedy decoding; --views does not apply (ignored)"]
    return verify_report(policy.model_type.value, size, checked_backend, reference_backend, compute_dtype, threshold,
                         seed, workload, resolved_device, policy.config, rows, passed, notes, failure, fp8=fp8)

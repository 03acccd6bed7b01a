"""Export one ``torch.nn.Module`` to an ONNX file, optionally simplify it, and prove ONNX Runtime runs it.

The path: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) with the batch axis as a
``torch.export.Dim`` -> optional onnxslim (or onnxsim) -> saved with external data when the
initializers exceed a threshold (2 GiB by default) -> loaded in ONNX Runtime (CPU) and compared with the
module at two batch sizes (one of them not the traced size, so a batch silently frozen to the example's
size fails) -> a manifest entry. If ONNX Runtime cannot load the optimized graph, the export is retried
without the onnxscript optimizer; if the dynamo exporter fails, the legacy TorchScript exporter is
tried (``exporter="auto"``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cortexflow.config import dtype_name
from cortexflow.errors import BackendUnavailableError, CortexFlowError
from cortexflow.onnx._deps import optional, require_exporter, require_onnx, require_onnxruntime
from cortexflow.onnx.settings import BATCH_DIM, BatchSpec

#: ``‖Δ‖/‖ref‖`` an export must meet against its PyTorch module to be kept (by export dtype).
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}

_NP_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
    "int32": np.int32, "bool": np.bool_, "uint8": np.uint8,
}
_ONNX_ELEM = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 9: "bool", 2: "uint8", 16: "bfloat16"}


class OnnxExportError(CortexFlowError):
    """An export failed, ONNX Runtime could not load it, or it did not match PyTorch (nothing was kept)."""


@contextlib.contextmanager
def quiet_export():
    """Silence the exporter's progress prints, warnings and log lines (errors still propagate)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx",
                                                "torch.onnx._internal.exporter._registration", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ort_session(path: "str | Path", providers: Sequence[Any] | None = None, threads: int | None = None):
    """An ONNX Runtime session for ``path`` (CPU provider unless ``providers`` says otherwise), warnings off."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


def io_description(path: "str | Path") -> dict[str, list[dict]]:
    """Inputs and outputs of the ONNX file at ``path``: name, shape (ints, or the symbolic name), dtype."""
    onnx = require_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                    for d in tensor.shape.dim]
            out.append({"name": value.name, "shape": dims, "dtype": _ONNX_ELEM.get(tensor.elem_type, str(tensor.elem_type))})
        return out

    initializers = {i.name for i in graph.initializer}
    return {"inputs": describe([i for i in graph.input if i.name not in initializers]), "outputs": describe(graph.output)}


def rel_error(output: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(max |Δ|, ‖Δ‖/‖ref‖)`` in fp64; booleans/integers compared exactly."""
    out = np.asarray(output).astype(np.float64)
    ref = np.asarray(reference).astype(np.float64)
    if out.shape != ref.shape:
        return float("inf"), float("inf")
    diff = out - ref
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    norm = float(np.linalg.norm(ref))
    rel = float(np.linalg.norm(diff)) / norm if norm > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _initializer_bytes(ir_model) -> int:
    total = 0
    for value in ir_model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def _deduplicate(ir_model) -> None:
    """Merge initializers with identical dtype, shape and bytes.

    The onnxscript optimizer folds ``Transpose(weight)`` into a new initializer at every use, so an
    unrolled denoising loop would store the action expert's weights once per step (10x for Pi0)."""
    import hashlib

    graph = ir_model.graph
    kept: dict[tuple, Any] = {}
    for value in tuple(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or value.is_graph_output():
            continue
        array = np.ascontiguousarray(tensor.numpy())  # folded transposes are strided views; 0-d may read as (1,)
        key = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest())
        if key in kept:
            value.replace_all_uses_with(kept[key])
            graph.initializers.pop(value.name)
        else:
            kept[key] = value


def _save_proto(proto, path: Path, external: bool) -> None:
    onnx = require_onnx()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _simplify(raw: Path, path: Path, external: bool) -> str:
    """Simplify ``raw`` into ``path`` with onnxslim (else onnxsim); returns the tool used."""
    onnxslim = optional("onnxslim")
    if onnxslim is not None:
        with quiet_export():
            proto = onnxslim.slim(str(raw))
        tool = "onnxslim"
    else:
        onnxsim = optional("onnxsim")
        if onnxsim is None:
            raise OnnxExportError("simplification needs onnxslim (pip install onnxslim) or onnxsim")
        onnx = require_onnx()
        proto, ok = onnxsim.simplify(onnx.load(str(raw)))
        if not ok:
            raise OnnxExportError("onnxsim could not validate the simplified model")
        tool = "onnxsim"
    _save_proto(proto, path, external)
    return tool


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def _dynamo_export(module, args, input_names, output_names, dynamic_shapes, opset, optimize):
    require_exporter()
    with quiet_export():
        program = torch.onnx.export(
            module, tuple(args), dynamo=True, verbose=False, input_names=list(input_names),
            output_names=list(output_names), opset_version=opset, dynamic_shapes=dynamic_shapes,
            optimize=optimize,
        )
    return program


def _legacy_export(module, args, path: Path, input_names, output_names, batch_axes, opset):
    dynamic_axes = {name: {axis: BATCH_DIM} for name, axis in batch_axes.items() if axis is not None}
    with quiet_export():
        torch.onnx.export(
            module, tuple(args), str(path), dynamo=False, input_names=list(input_names),
            output_names=list(output_names), opset_version=opset, dynamic_axes=dynamic_axes or None,
        )


def export_module(
    module: torch.nn.Module,
    path: "str | Path",
    *,
    stage: str,
    input_specs: Sequence[Any],
    output_specs: Sequence[Any],
    batch: BatchSpec,
    make_inputs: Callable[[int], list[torch.Tensor]],
    opset: int = 20,
    dtype: torch.dtype = torch.float32,
    simplify: bool = False,
    external_data_threshold: int = 2 * 1024**3,
    check: bool = True,
    tolerance: float | None = None,
    exporter: str = "dynamo",
) -> dict:
    """Export ``module`` to ``path`` (+ ``path.data`` when large); return the stage's manifest entry.

    ``input_specs``/``output_specs`` are :class:`~cortexflow.onnx.stages.TensorSpec`-like (``name``,
    ``shape`` with ``None`` on the batch axis, ``dtype``). ``make_inputs(b)`` gives example inputs at
    batch ``b``. With ``check``, ONNX Runtime must load the file and match ``module`` (‖Δ‖/‖ref‖ ≤
    ``tolerance``) at ``batch.check_sizes``, else :class:`OnnxExportError` is raised and the file removed.
    ``exporter``: ``"dynamo"`` (default), ``"legacy"`` (the TorchScript exporter) or ``"auto"`` (dynamo,
    then legacy on failure). The legacy exporter cannot export the policy stages (it fails on the
    dtype casts); it is there for simple modules."""
    path = Path(path)
    module = module.eval()
    input_names = [s.name for s in input_specs]
    output_names = [s.name for s in output_specs]
    batch_dim = torch.export.Dim(BATCH_DIM, min=batch.min, max=batch.max) if batch.dynamic else None
    dynamic_shapes = tuple(
        {s.shape.index(None): batch_dim} if (batch_dim is not None and None in s.shape) else None for s in input_specs
    )
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        dynamic_shapes = (dynamic_shapes,)  # forward(*args): the spec nests like the inputs
    example = make_inputs(batch.example)
    tolerance = CHECK_TOLERANCE.get(dtype, 2e-2) if tolerance is None else tolerance
    attempts = {"dynamo": [True, False], "legacy": [None], "auto": [True, False, None]}.get(exporter)
    if attempts is None:
        raise OnnxExportError(f"unknown exporter {exporter!r}; expected dynamo, legacy or auto")
    raw = path.with_name(path.stem + ".raw.onnx")
    failures: list[str] = []
    start = time.perf_counter()
    for optimize in attempts:
        used = "torch.onnx.export(dynamo=True" + ("" if optimize else ", optimize=False") + ")" if optimize is not None \
            else "torch.onnx.export(dynamo=False)"
        target = raw if simplify else path
        try:
            if optimize is None:
                _legacy_export(module, example, target, input_names, output_names,
                               {s.name: (s.shape.index(None) if None in s.shape else None) for s in input_specs}, opset)
                proto = require_onnx().load(str(target))
                size = sum(len(t.raw_data) for t in proto.graph.initializer)
                external = size > external_data_threshold
                _save_proto(proto, target, external)
            else:
                program = _dynamo_export(module, example, input_names, output_names,
                                         dynamic_shapes if batch_dim is not None else None, opset, optimize)
                _deduplicate(program.model)
                size = _initializer_bytes(program.model)
                external = size > external_data_threshold
                import onnx_ir

                _remove(target)
                onnx_ir.save(program.model, str(target),
                             external_data=(target.name + ".data") if external else None,
                             size_threshold_bytes=1024 if external else 2**62)
                del program
        except BackendUnavailableError:  # a missing package: the same for every attempt, said once
            _remove(target)
            raise
        except Exception as err:  # noqa: BLE001 - every exporter failure is reported together below
            failures.append(f"{used}: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
            _remove(target)
            continue
        simplifier = None
        if simplify:
            try:
                simplifier = _simplify(raw, path, external)
            except Exception as err:  # noqa: BLE001
                failures.append(f"simplify: {type(err).__name__}: {err}")
                _remove(path)
                os.replace(raw, path)
                if raw.with_name(raw.name + ".data").exists():
                    # the external data file name is recorded inside the model: re-save under the final name
                    _save_proto(require_onnx().load(str(path)), path, external)
                simplifier = None
            finally:
                _remove(raw)
        if not check:
            entry = _entry(path, stage, used, external, size, simplifier, None, time.perf_counter() - start)
            entry["checked"] = False
            entry["fallbacks"] = failures
            return entry
        try:
            session = ort_session(path)
        except Exception as err:  # noqa: BLE001
            failures.append(f"{used}: ONNX Runtime cannot load the file: {str(err).splitlines()[0][:300]}")
            _remove(path)
            continue
        parity = _parity(module, session, output_names, make_inputs, batch.check_sizes, tolerance)
        del session
        if parity["rel_l2"] > tolerance or not np.isfinite(parity["rel_l2"]):
            _remove(path)
            raise OnnxExportError(
                f"ONNX export of stage {stage!r} does not match PyTorch: ‖Δ‖/‖ref‖ = {parity['rel_l2']:.3g} "
                f"(max |Δ| {parity['max_abs']:.3g}) at batch {parity['worst_batch']} on output "
                f"{parity['worst_output']!r}, tolerance {tolerance:g}; the export was not kept"
            )
        entry = _entry(path, stage, used, external, size, simplifier, parity, time.perf_counter() - start)
        entry["fallbacks"] = failures  # earlier attempts that failed (empty when the first one worked)
        return entry
    raise OnnxExportError(f"could not export stage {stage!r} to ONNX: " + " | ".join(failures))


def _parity(module, session, output_names, make_inputs, sizes, tolerance) -> dict:
    worst = {"max_abs": 0.0, "rel_l2": 0.0, "worst_batch": None, "worst_output": None, "batches": list(sizes)}
    input_names = [i.name for i in session.get_inputs()]
    for size in sizes:
        inputs = make_inputs(size)
        with torch.inference_mode():
            reference = module(*inputs)
        reference = reference if isinstance(reference, (tuple, list)) else (reference,)
        feeds = {name: _to_numpy(t) for name, t in zip(input_names, inputs)}
        try:
            outputs = session.run(output_names, feeds)
        except Exception as err:  # noqa: BLE001 - a frozen batch shows up here
            return {**worst, "max_abs": float("inf"), "rel_l2": float("inf"), "worst_batch": size,
                    "worst_output": f"(run failed: {str(err).splitlines()[0][:200]})"}
        for name, out, ref in zip(output_names, outputs, reference):
            max_abs, rel = rel_error(out, _to_numpy(ref.float() if ref.dtype == torch.bfloat16 else ref))
            if rel >= worst["rel_l2"] or not np.isfinite(rel):
                worst.update(rel_l2=rel, worst_batch=size, worst_output=name)
            worst["max_abs"] = max(worst["max_abs"], max_abs)
    return worst


def _entry(path: Path, stage: str, exporter: str, external: bool, size: int, simplifier, parity, seconds) -> dict:
    data = path.with_name(path.name + ".data")
    entry = {
        "stage": stage,
        "file": path.name,
        "external_data": data.name if external and data.exists() else None,
        "bytes": path.stat().st_size + (data.stat().st_size if external and data.exists() else 0),
        "initializer_bytes": size,
        "exporter": exporter,
        "simplifier": simplifier,
        "export_s": round(seconds, 3),
        **io_description(path),
    }
    if parity is not None:
        entry["parity"] = parity
        entry["checked"] = True
    return entry


def dtype_of(name: str) -> np.dtype:
    """numpy dtype of a manifest dtype name."""
    return np.dtype(_NP_DTYPES[name])


__all__ = ["CHECK_TOLERANCE", "OnnxExportError", "dtype_name", "export_module", "io_description", "ort_session",
           "quiet_export", "rel_error"]

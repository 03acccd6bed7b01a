"""Run one exported stage in ONNX Runtime, with its inputs checked against the manifest first.

Inputs of the wrong rank or dtype, a fixed dimension that differs, or a batch outside the exported
range raise :class:`~cortexflow.errors.InputError` naming the stage and the shapes it accepts (ONNX
Runtime itself does not know the exported batch range). On CPU, tensors cross as numpy arrays without
copies; with ``onnxruntime-gpu`` and a CUDA device, inputs and outputs are bound to torch CUDA memory
(IO binding), so nothing goes through the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cortexflow.errors import InputError
from cortexflow.onnx._deps import require_onnxruntime
from cortexflow.onnx.exporter import dtype_of, ort_session

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
                 "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8}


def providers_for(device: torch.device, provider: str = "auto") -> list[Any]:
    """ORT providers: CUDA (+CPU fallback) for a CUDA device when onnxruntime-gpu has it, else CPU.

    ``provider``: ``"auto"``, ``"cpu"`` or ``"cuda"`` (an error when the CUDA provider is missing)."""
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    provider = provider.strip().lower()
    if provider not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown ONNX Runtime provider {provider!r}; expected auto, cpu or cuda")
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "cuda" and not has_cuda:
        from cortexflow.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"the CUDA execution provider is not in this onnxruntime (available: {available}); "
            "pip install onnxruntime-gpu, or use provider='cpu'"
        )
    if has_cuda and device.type == "cuda" and provider in ("auto", "cuda"):
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def describe_allowed(stage: str, inputs: Sequence[Mapping], batch: Mapping) -> str:
    """``images (B, 2, 3, 224, 224) float32, ...`` with ``B in 1..6`` (or ``static batch 1``)."""
    parts = []
    for spec in inputs:
        dims = ["B" if isinstance(d, str) else str(d) for d in spec["shape"]]
        parts.append(f"{spec['name']} ({', '.join(dims)}{',' if len(dims) == 1 else ''}) {spec['dtype']}")
    rng = f"B in {batch['min']}..{batch['max']}" if batch.get("mode") == "dynamic" else f"static batch {batch['min']}"
    return f"stage {stage!r} accepts {'; '.join(parts)} with {rng}"


class OrtStage:
    """One ONNX file of a manifest: validated inputs in, torch tensors (on ``device``) out."""

    def __init__(self, stage: str, path: "str | Path", entry: Mapping, batch: Mapping,
                 device: "torch.device | str" = "cpu", provider: str = "auto", threads: int | None = None):
        self.stage = stage
        self.path = Path(path)
        self.inputs = list(entry["inputs"])
        self.outputs = list(entry["outputs"])
        self.batch = dict(batch)
        self.device = torch.device(device)
        self.providers = providers_for(self.device, provider)
        self.session = ort_session(self.path, self.providers, threads)
        self.uses_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"

    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self.inputs]

    def allowed(self) -> str:
        return describe_allowed(self.stage, self.inputs, self.batch)

    def validate(self, feeds: Mapping[str, Any]) -> int | None:
        """Check ``feeds`` against the exported inputs; return the batch size (None without a batch axis)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"onnx stage {self.stage!r}: missing input(s) {missing}; {self.allowed()}")
        batch = None
        for spec in self.inputs:
            value = feeds[spec["name"]]
            shape = tuple(value.shape)
            dtype = str(value.dtype).removeprefix("torch.")
            dtype = {"bool_": "bool"}.get(dtype, dtype)
            expected = spec["shape"]
            problem = None
            if len(shape) != len(expected):
                problem = f"has rank {len(shape)} (shape {shape}); expected rank {len(expected)}"
            elif dtype != spec["dtype"]:
                problem = f"has dtype {dtype}; expected {spec['dtype']}"
            else:
                for axis, (got, want) in enumerate(zip(shape, expected)):
                    if isinstance(want, str):
                        if batch is not None and got != batch:
                            problem = f"has batch {got} on axis {axis} but another input has batch {batch}"
                        batch = got
                    elif got != want:
                        problem = f"has shape {shape}; axis {axis} must be {want}"
                        if axis == self._batch_axis(spec) and self.batch.get("mode") == "static":
                            problem += f" (this export has a static batch of {want}; re-export with a dynamic batch)"
                    if problem:
                        break
            if problem is None and batch is not None and not (self.batch["min"] <= batch <= self.batch["max"]):
                problem = f"has batch {batch}, outside the exported range {self.batch['min']}..{self.batch['max']}"
            if problem:
                raise InputError(f"onnx stage {self.stage!r}: input {spec['name']!r} {problem}; {self.allowed()}")
        return batch

    def _batch_axis(self, spec: Mapping) -> int | None:
        # static exports have no symbolic axis: the batch is axis 0, except for the stacked KV cache
        return 1 if spec["name"] in ("kv_k", "kv_v") else (0 if spec["shape"] else None)

    def __call__(self, **feeds: Any) -> dict[str, torch.Tensor]:
        batch = self.validate(feeds)
        if self.uses_cuda and all(isinstance(feeds[n], torch.Tensor) and feeds[n].is_cuda for n in self.input_names):
            return self._run_bound(feeds, batch)
        arrays = {n: _numpy(feeds[n]) for n in self.input_names}
        outputs = self.session.run([o["name"] for o in self.outputs], arrays)
        return {o["name"]: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                for o, v in zip(self.outputs, outputs)}

    def _run_bound(self, feeds: Mapping[str, torch.Tensor], batch: int | None) -> dict[str, torch.Tensor]:
        """CUDA provider: bind torch CUDA buffers directly (no host round trip)."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        keep = []
        for spec in self.inputs:
            tensor = feeds[spec["name"]].contiguous()
            keep.append(tensor)
            binding.bind_input(spec["name"], "cuda", index, dtype_of(spec["dtype"]), list(tensor.shape), tensor.data_ptr())
        results = {}
        for spec in self.outputs:
            shape = [batch if isinstance(d, str) else d for d in spec["shape"]]
            out = torch.empty(shape, dtype=_TORCH_DTYPES[spec["dtype"]], device=self.device)
            binding.bind_output(spec["name"], "cuda", index, dtype_of(spec["dtype"]), shape, out.data_ptr())
            results[spec["name"]] = out
        torch.cuda.synchronize(self.device)
        self.session.run_with_iobinding(binding)
        return results


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)

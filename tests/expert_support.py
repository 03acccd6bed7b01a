"""Backends for tests that run a model with FP8 action-expert weights (tests/test_expert_layer.py, test_expert_step.py)."""

from cortexflow.quantization.fp8 import quantize_weight

EXPERT_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def fp8_expert_backends():
    """A Triton backend that quantises the fused expert projections after fusing them (``quantize_in_place``),
    and a PyTorch backend that replaces the same projections by their dequantised values."""
    from cortexflow.backends.pytorch import PyTorchBackend
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.quantization.fp8 import quantize_in_place

    class Fp8ExpertTriton(TritonBackend):
        def fuse_weights(self, weights, groups):
            weights = super().fuse_weights(weights, groups)
            for layer in groups.decoder_layers:
                for fused, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
                    rows = [(layer.name(p), weights[layer.name(p)].shape[0]) for p in parts]
                    quantize_in_place(weights, layer.name(fused), rows)
                for name in ("o", "down"):
                    quantize_in_place(weights, layer.name(name))
            return weights

    class DequantisedExpertPyTorch(PyTorchBackend):
        def fuse_weights(self, weights, groups):
            for layer in groups.decoder_layers:
                for part in EXPERT_PROJECTIONS:
                    w = weights[layer.name(part)]
                    weights[layer.name(part)] = quantize_weight(w).dequantize(w.dtype)
            return weights

    return Fp8ExpertTriton, DequantisedExpertPyTorch


#: Sizes of a tiny Pi0 / Pi0.5 whose expert the persistent kernel's GPU tiling also fits (``check_expert_shapes``
#: with the default ``ExpertTiling``: K steps of 128, RoPE tiles of 2 x 16, o / down split into 8 K ranges of
#: whole steps), so the backend tests run the kernel on a GPU too and not the kernel chain it falls back to.
GPU_TILING_EXPERT = dict(head_dim=256, decoder_dim=128, decoder_mlp_dim=1024)  # on a GPU only: slower interpreted


def tiny_pi0_call(seed: int):
    """Random inputs of one call of a tiny Pi0 (``tiny_model_config`` with chunk 3): two 30 x 30 views, the
    noise ``(3, 8)`` and a 5-value state."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    return images, rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal(5)

"""Relative error (per logits row) of the tiny FP8 Llama of tests/test_fp8_token_decoder.py against the model with
dequantised weights, for each one-row route; run from a build's root (its tests/ and package)."""

import sys

import torch

sys.path.insert(0, "tests")

import test_fp8_token_decoder as t  # noqa: E402

from cortexflow.backends.triton_backend import TritonBackend  # noqa: E402

lm = t.LlamaLM(t.DIMS)
prompt = torch.randint(0, t.VOCAB, (1, t.PROMPT), generator=torch.Generator().manual_seed(1)).to(t.DEVICE)
forced = torch.randint(0, t.VOCAB, (t.STEPS,), generator=torch.Generator().manual_seed(2)).to(t.DEVICE)
backend = TritonBackend(torch.device(t.DEVICE), t.DTYPE)
dequantized, _ = t.run(lm, backend, t.dequantized(t.fused_weights(lm, fp8=True)), prompt, forced)
reference, _ = t.run(lm, backend, t.fused_weights(lm, fp8=False), prompt, forced)
weights = t.fused_weights(lm, fp8=True)
for route, options in t.OPTIONS.items():
    logits, _ = t.run(lm, TritonBackend.configured(**options)(torch.device(t.DEVICE), t.DTYPE), weights, prompt, forced)
    print(route, "vs dequantised", [round(v, 4) for v in t.relative_error(logits, dequantized).tolist()],
          "vs bf16", [round(v, 4) for v in t.relative_error(logits, reference).tolist()])

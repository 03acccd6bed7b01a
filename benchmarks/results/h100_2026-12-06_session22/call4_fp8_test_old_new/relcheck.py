"""Relative error (per logits row) of the tiny FP8 Llama of tests/test_fp8_token_decoder.py against the model with
dequantised weights, for each one-row route; run from a build's root (its tests/ and package)."""
import sys, torch
sys.path.insert(0, "tests")
import test_fp8_token_decoder as t
from cortexflow.backends.triton_backend import TritonBackend
lm = t.LlamaLM(t.DIMS)
prompt = torch.randint(0, t.VOCAB, (1, t.PROMPT), generator=torch.Generator().manual_seed(1)).to(t.DEVICE)
forced = torch.randint(0, t.VOCAB, (t.STEPS,), generator=torch.Generator().manual_seed(2)).to(t.DEVICE)
backend = TritonBackend(torch.device(t.DEVICE), t.DTYPE)
deq, _ = t.run(lm, backend, t.dequantized(t.fused_weights(lm, fp8=True)), prompt, forced)
w = t.fused_weights(lm, fp8=True)
for route, opts in t.OPTIONS.items():
    lg, _ = t.run(lm, TritonBackend.configured(**opts)(torch.device(t.DEVICE), t.DTYPE), w, prompt, forced)
    print(route, [round(v, 4) for v in t.relative_error(lg, deq).tolist()])

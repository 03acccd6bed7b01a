"""``cortexflow demo --model openvla|rt2``: a tiny deterministic random token-decoding policy on CPU.

The random weights are written in the real on-disk format (a sharded Hugging Face OpenVLA folder, or an
openpi-layout PaliGemma ``model.safetensors``) into a temporary folder and loaded through
``create_openvla_inference`` / ``create_rt2_inference`` (CPU, fp32). The demo has no tokenizer, so the
prompt is fed as ids: BOS followed by its UTF-8 bytes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from cortexflow.config import VLAModelType
from cortexflow.demo import DEMO_PROMPT, synthetic_image
from cortexflow.random_token_vla import (
    example_norm_stats,
    tiny_openvla_config,
    tiny_rt2_config,
    write_openvla_checkpoint,
    write_rt2_checkpoint,
)
from cortexflow.factory import create_openvla_inference, create_rt2_inference


@dataclass
class TokenDemoResult:
    """What the demo prints: the model, the prompt ids, the decoded tokens, actions and latencies."""

    model: str
    config: dict
    prompt_token_ids: list[int]
    tokens: list[int]
    actions: np.ndarray
    latencies_ms: list[float]
    deterministic: bool

    def to_dict(self) -> dict:
        rest = self.latencies_ms[1:]
        return {
            "model": self.model,
            "config": self.config,
            "device": "cpu",
            "dtype": "float32",
            "prompt": DEMO_PROMPT,
            "prompt_token_ids": self.prompt_token_ids,
            "prompt_encoding": "no tokenizer: [BOS] + UTF-8 bytes",
            "generated_token_ids": self.tokens,
            "actions": self.actions.tolist(),
            "latency_ms": {"first": self.latencies_ms[0], "median_rest": statistics.median(rest) if rest else None},
            "deterministic": self.deterministic,
        }


def run_token_demo(model: "VLAModelType | str", seed: int = 0, repeat: int = 3) -> TokenDemoResult:
    """Build the tiny random ``model`` (openvla or rt2), call ``predict`` ``repeat`` times on one synthetic image."""
    model_type = VLAModelType.parse(model)
    with tempfile.TemporaryDirectory(prefix=f"cortexflow-demo-{model_type.value}-") as directory:
        if model_type == VLAModelType.OPENVLA:
            config = tiny_openvla_config()
            write_openvla_checkpoint(directory, config, seed=seed, dtype=torch.float32,
                                     norm_stats=example_norm_stats(config.action_dim))
            engine = create_openvla_inference(directory, device="cpu", dtype="float32",
                                              model_config={"space_token_id": config.space_token_id})
            bos, vocab = config.bos_id, config.text_vocab_size
        elif model_type == VLAModelType.RT2:
            config = tiny_rt2_config()
            write_rt2_checkpoint(directory, config, seed=seed)
            engine = create_rt2_inference(directory, device="cpu", dtype="float32", model_config=config)
            bos, vocab = 2, config.vocab_size
        else:
            raise ValueError(f"the token demo builds openvla or rt2, not {model_type.value!r}")
    ids = [bos, *(b % vocab for b in DEMO_PROMPT.encode("utf-8"))]
    image = synthetic_image(0, seed)
    latencies, first, deterministic, actions = [], None, True, None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        actions = engine.predict(image, prompt_tokens=ids)
        latencies.append((time.perf_counter() - start) * 1e3)
        if first is None:
            first = actions
        elif not np.array_equal(first, actions):
            deterministic = False
    return TokenDemoResult(
        model=model_type.value, config=engine.config.to_dict(), prompt_token_ids=engine.prompt_ids(None, ids),
        tokens=engine.last_tokens.tolist(), actions=actions, latencies_ms=latencies, deterministic=deterministic,
    )

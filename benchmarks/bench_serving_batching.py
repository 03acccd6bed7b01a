"""Throughput and latency of the policy server against the number of clients, cross-request batching off
and on (``serve --max-batch``): for each client count, a server with the policy on this machine is started
in-process and ``cortexflow loadtest``'s client (msgpack over WebSocket, openpi's protocol) sends
``--requests`` requests per client; throughput (replies/s) and p50/p99 latency are reported per row.

    python benchmarks/bench_serving_batching.py --json serving_batching.json              # GPU: real-size Pi0
    python benchmarks/bench_serving_batching.py --size tiny --device cpu --clients 1,4,16  # CPU: tiny demo Pi0

Real size: random non-zero bf16 Pi0 weights (2 views + a masked third slot, the droid robot, 224x224 images,
prompts through a tiny SentencePiece tokenizer), CUDA graphs per batch size captured at warm-up. Tiny: the ``--checkpoint demo`` model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from cortexflow.serving.loadtest import run_loadtest
from cortexflow.serving.policy import PolicyOptions, build_policy
from cortexflow.serving.server import PolicyServer
from cortexflow.tools import environment_info, resolve_device_dtype


def build(size: str, device: str, dtype: str, directory: str, backend: str):
    if size == "tiny":
        return build_policy(PolicyOptions(checkpoint="demo", robot="droid", device=device, dtype=dtype, backend=backend))
    from pathlib import Path

    from cortexflow.random_checkpoint import write_checkpoint
    from cortexflow.tiny_tokenizer import write_tiny_tokenizer
    from cortexflow.tools import model_config

    config = model_config("pi0", "real")
    write_checkpoint(directory, config, seed=0)
    tokenizer = write_tiny_tokenizer(Path(directory) / "tokenizer.model")  # the server tokenizes the droid task text
    return build_policy(PolicyOptions(checkpoint=directory, model="pi0", robot="droid", device=device, dtype=dtype,
                                      default_prompt="pick up the cube", model_config=config.to_dict(),
                                      tokenizer=str(tokenizer), backend=backend))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="real", choices=["real", "tiny"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=2.0)
    parser.add_argument("--backend", default="auto", help="pytorch, triton, or auto (triton on a GPU, pytorch on a CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "pytorch")
        policy = build(args.size, str(device), str(dtype).removeprefix("torch."), directory, backend)
        for max_batch in (1, args.max_batch):
            server = PolicyServer(policy, "127.0.0.1", 0, max_batch=max_batch, batch_window_ms=args.batch_window_ms,
                                  queue_size=max(64, max(clients)), max_connections=max(clients) + 4).start(timeout=600)
            try:
                for count in clients:
                    report = run_loadtest(server.url, count, args.requests, timeout=600).to_dict()
                    row = {"clients": count, "max_batch": max_batch, "batch_window_ms": args.batch_window_ms,
                           "ok": report["ok"], "errors": report["errors"], "throughput_rps": report["throughput_rps"],
                           "p50_ms": report["latency_ms"]["p50"], "p99_ms": report["latency_ms"]["p99"]}
                    rows.append(row)
                    print(f"batch {max_batch:>2}  clients {count:>3}: {row['throughput_rps']:8.1f} req/s  "
                          f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  errors {row['errors']}", flush=True)
            finally:
                server.stop(timeout=60)
    result = {"environment": environment_info(device), "size": args.size, "dtype": str(dtype), "backend": backend,
              "requests_per_client": args.requests, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up time of a token VLA with ``precision="fp8"`` with and without the FP8 weight cache (``fp8_cache=``).

Writes a random checkpoint at the published size (OpenVLA-7B by default, bf16 safetensors) into ``--dir``, then creates
the engine three times, each in its own process (so each has its own peak host memory): without the cache, with an
empty cache (a miss: the layers are quantised and the entry written) and with the entry (a hit: the language model's
bf16 projections are never read). Each case records its seconds, the process's peak host memory (``ru_maxrss``), the
peak GPU memory and a fingerprint of each of the engine's prepared weights. The tensors every case holds must have
equal fingerprints (the cache restores exactly what the quantisation makes); the engines without a hit hold more
tensors besides, the q/k/v and gate/up views into the fused projections and the raw norm weights the fold replaced
(``tests/test_fp8_cache.py`` checks the same on tiny checkpoints), so the fingerprints of whole weight dicts differ.
``--drop-caches`` empties the page cache before each case (needs
root; recorded whether it worked), so that the reads come from the disk and not from the memory the checkpoint was
just written through. Writes JSON to ``--out``.

    python3 benchmarks/bench_fp8_cache.py --model openvla --dir /tmp/ckpt --out fp8_cache.json --drop-caches
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("no cache", "miss", "hit")


def write_checkpoint(model_name: str, size: str, directory: Path) -> dict:
    """A random bf16 checkpoint of ``model_name`` at ``size`` ("real": the published one) in ``directory``; its bytes
    and seconds."""
    from cortexflow.random_token_vla import example_norm_stats, write_openvla_checkpoint
    from cortexflow.tools import random_token_weights, token_model

    if model_name != "openvla":
        raise SystemExit(f"--model {model_name}: only openvla is written here")
    start = time.perf_counter()
    model = token_model("openvla", size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = {n: t.cpu() for n, t in random_token_weights(model, 0, torch.bfloat16, device).items()}
    write_openvla_checkpoint(directory, model.config, dtype=torch.bfloat16, weights=weights,
                             norm_stats=example_norm_stats(model.config.action_dim))
    nbytes = sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors")
    return {"size": size, "bytes": nbytes, "seconds": time.perf_counter() - start}


def drop_page_cache() -> bool:
    """Empty the page cache (root only); whether it worked."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_case(case: str, checkpoint: Path, cache: Path) -> dict:
    """Create the engine for ``case`` in this process; what it took."""
    import cortexflow as cf
    from cortexflow.onnx.hashing import weights_fingerprint

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = cf.create_openvla_inference(checkpoint, backend="triton", device="cuda", dtype="bfloat16",
                                         precision="fp8", use_cuda_graphs=False,
                                         fp8_cache=False if case == "no cache" else cache)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"case": case, "seconds": seconds, "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tensor_fingerprints": {name: weights_fingerprint({name: t}) for name, t in engine.weights.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="openvla")
    parser.add_argument("--size", default="real", choices=("real", "tiny"), help="tiny: a plumbing check")
    parser.add_argument("--dir", type=Path, required=True, help="folder for the checkpoint and the cache (emptied)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache before each case (root)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    checkpoint, cache = args.dir / "checkpoint", args.dir / "fp8_cache"
    if args.case:
        args.out.write_text(json.dumps(run_case(args.case, checkpoint, cache)))
        return
    from cortexflow.tools import environment_info

    shutil.rmtree(args.dir, ignore_errors=True)
    result = {"environment": environment_info(torch.device("cuda")), "model": args.model,
              "checkpoint": write_checkpoint(args.model, args.size, checkpoint), "cases": []}
    for case in CASES:
        dropped = drop_page_cache() if args.drop_caches else False
        part = args.dir / "case.json"
        subprocess.run([sys.executable, __file__, "--model", args.model, "--size", args.size, "--dir", str(args.dir),
                        "--out", str(part), "--case", case], check=True)
        result["cases"].append({**json.loads(part.read_text()), "page_cache_dropped": dropped})
        print(json.dumps({k: v for k, v in result["cases"][-1].items() if k != "tensor_fingerprints"}), flush=True)
        args.out.write_text(json.dumps(result, indent=2))
    entry = [p for p in cache.iterdir() if not p.name.startswith(".")]
    result["cache_entry_bytes"] = sum(f.stat().st_size for p in entry for f in p.iterdir())
    result.update(compare_tensors([c["tensor_fingerprints"] for c in result["cases"]]))
    args.out.write_text(json.dumps(result, indent=2))
    print(f"the {result['common_tensors']} tensors every case holds equal in all cases: {result['fingerprints_equal']} "
          f"(differing: {result['differing_tensors'][:5]}); tensors only some cases hold: "
          f"{result['tensors_not_in_every_case']}; entry {result['cache_entry_bytes'] / 2**30:.2f} GiB")


def compare_tensors(cases: list[dict[str, str]]) -> dict:
    """Per-tensor fingerprints of several engines compared over the tensors all of them hold."""
    common = set.intersection(*(set(c) for c in cases))
    differing = sorted(name for name in common if len({c[name] for c in cases}) > 1)
    return {"common_tensors": len(common), "fingerprints_equal": not differing, "differing_tensors": differing,
            "tensors_not_in_every_case": len(set.union(*(set(c) for c in cases)) - common)}


if __name__ == "__main__":
    main()

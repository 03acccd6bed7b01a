"""Soak test of the policy server: N clients x M requests, good and bad frames mixed, server RSS sampled.

Starts ``cortexflow serve --checkpoint demo --robot droid --seed 0`` (the tiny random Pi0 on CPU, seeded
noise) in a subprocess and connects ``--clients`` robots, each sending ``--requests`` frames one after the
other; every ``--bad-every``-th frame is a hostile one (a frame bomb, a 60 KB key, a lying array header,
NaN state, garbage bytes, a text frame, ...). Every good frame's actions must equal a direct
``ServedPolicy.predict`` of the same observation in this process (same demo weights and seed), every bad
frame must get an error text frame; anything else counts as mismatched, a missing reply as lost. The
server runs with ``OMP_NUM_THREADS=--torch-threads``; its RSS (``/proc/PID/status``, Linux) is sampled
every ``--sample-s`` seconds, and growth is measured from the sample after the first 5 % of requests
(allocator warm) to the last.

Writes a JSON report (``--out``) and prints one summary line.

    python benchmarks/soak_server.py --clients 8 --requests 2000 --out benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.serving import codec  # noqa: E402
from cortexflow.serving.policy import PolicyOptions, build_policy  # noqa: E402

IMAGE_SIZE = 32
DISTINCT_OBSERVATIONS = 16


def observation(i: int) -> dict:
    rng = np.random.default_rng([7, i])
    return {
        "observation/exterior_image_1_left": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "observation/joint_position": rng.uniform(-1, 1, 7),
        "observation/gripper_position": rng.uniform(0, 1, 1),
        "prompt": f"task {i}",
    }


def hostile_frames() -> list[bytes | str]:
    good = observation(0)
    n = 1_000_000
    lying = {b"__ndarray__": True, b"data": b"\0" * 10, b"dtype": "<f4", b"shape": [7]}
    return [
        b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n,
        codec.pack({**good, "k" * 60_000: 1}),
        codec.pack({**good, "observation/joint_position": lying}),
        codec.pack({**good, "observation/joint_position": np.full(7, np.nan)}),
        codec.pack({**good, "observation/joint_position": np.full(7, 1e308)}),
        b"\xc1\xff\x00 not msgpack",
        "a text frame",
        b"\x91" * 200 + b"\x90",
    ]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_server(torch_threads: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "cortexflow.cli", "serve", "--checkpoint", "demo", "--robot", "droid", "--seed", "0",
         "--device", "cpu", "--port", "0", "--max-connections", "64"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
             "OMP_NUM_THREADS": str(torch_threads)},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep it drained
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bad-every", type=int, default=10, help="every k-th frame of a client is a hostile one")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="the server's OMP_NUM_THREADS (more threads than free cores make every call slower)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from websockets.sync.client import connect

    torch.set_num_threads(args.torch_threads)

    policy = build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu", seed=0))
    frames = [codec.pack(observation(i)) for i in range(DISTINCT_OBSERVATIONS)]
    expected = [policy.predict(observation(i)) for i in range(DISTINCT_OBSERVATIONS)]
    bad = hostile_frames()
    process, port = start_server(args.torch_threads)
    total = args.clients * args.requests
    done = [0] * args.clients
    counts = {"ok": 0, "lost": 0, "mismatched": 0, "bad_refused": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    samples: list[tuple[float, int, int]] = []  # (seconds, requests done, rss bytes)
    finished = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not finished.is_set():
            samples.append((time.perf_counter() - start, sum(done), rss_bytes(process.pid)))
            finished.wait(args.sample_s)
        samples.append((time.perf_counter() - start, sum(done), rss_bytes(process.pid)))

    def client(index: int) -> None:
        try:
            with connect(f"ws://127.0.0.1:{port}", open_timeout=args.timeout, max_size=None) as conn:
                conn.recv(timeout=args.timeout)
                for j in range(args.requests):
                    hostile = (j + index) % args.bad_every == args.bad_every - 1
                    k = (index * args.requests + j) % DISTINCT_OBSERVATIONS
                    start = time.perf_counter()
                    conn.send(bad[(index + j) % len(bad)] if hostile else frames[k])
                    reply = conn.recv(timeout=args.timeout)
                    elapsed = time.perf_counter() - start
                    with lock:
                        if hostile:
                            counts["bad_refused" if isinstance(reply, str) else "mismatched"] += 1
                        elif isinstance(reply, str) or not np.allclose(codec.unpack(reply)["actions"], expected[k],
                                                                       rtol=1e-5, atol=1e-6):
                            counts["mismatched"] += 1
                        else:
                            counts["ok"] += 1
                            latencies.append(elapsed * 1e3)
                    done[index] = j + 1
        except Exception as err:  # the rest of this client's requests are lost
            print(f"client {index}: {type(err).__name__}: {err}", file=sys.stderr)
        with lock:
            counts["lost"] += args.requests - done[index]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    finished.set()
    sampler.join()
    process.terminate()
    exit_code = process.wait(timeout=60)
    warm = next(s for s in samples if s[1] >= 0.05 * total) if any(s[1] >= 0.05 * total for s in samples) else samples[0]
    last = samples[-1]
    report = {
        "machine": f"{platform.node() or '?'}: {os.cpu_count()} CPU cores shared, {platform.processor() or platform.machine()}, "
                   f"Linux {platform.release()}",
        "model": "demo (tiny random pi0, weights seed 0), robot droid, CPU float32, seeded noise",
        "server_torch_threads": args.torch_threads,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "requests": total,
        "hostile_every": args.bad_every,
        **counts,
        "wall_s": round(wall, 2),
        "throughput_rps": round(total / wall, 1),
        "good_latency_ms": {q: round(float(np.percentile(latencies, p)), 2) for q, p in
                            (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))} if latencies else None,
        "rss_mib": {"start": round(samples[0][2] / 2**20, 1), "warm": round(warm[2] / 2**20, 1),
                    "max": round(max(s[2] for s in samples) / 2**20, 1), "end": round(last[2] / 2**20, 1)},
        "rss_growth_percent": round(100 * (last[2] - warm[2]) / warm[2], 2),
        "server_exit_code": exit_code,
        "rss_samples": [(round(t, 1), n, round(r / 2**20, 1)) for t, n, r in samples],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        samples = report.pop("rss_samples")  # (seconds, requests done, RSS MiB), one line
        text = json.dumps(report, indent=1)
        args.out.write_text(text[:-2] + f',\n "rss_samples": {json.dumps(samples)}\n}}\n')
    print(f"{total} requests ({counts['bad_refused']} hostile refused): {counts['ok']} ok, {counts['lost']} lost, "
          f"{counts['mismatched']} mismatched in {wall:.0f} s; RSS {report['rss_mib']['warm']} -> "
          f"{report['rss_mib']['end']} MiB ({report['rss_growth_percent']:+.2f} %)")


if __name__ == "__main__":
    main()

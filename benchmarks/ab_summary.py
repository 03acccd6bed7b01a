"""Summary of one ``gpu_triton_check.sh final`` run: the old and the new build side by side.

Reads the run's files in ``RUNS`` (``bench_<workload>_<build>_r<round>.json`` from ``cortexflow bench``,
``verify_<model>.json`` from ``cortexflow verify``, ``builds.json``, ``steps.txt``, ``gpu_tests.log``)
and writes ``summary.json`` into ``OUT``: per workload (model, views, prompt length) the median ms of each
build in each round, the new build's change against the old one's (mean of the rounds) and the old build's
own round-to-round spread; per verified model whether it passed and the final actions' ‖Δ‖/‖ref‖; the steps
that failed or were left out for time. Prints the table last.

    python benchmarks/ab_summary.py RUNS OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: ``build``: old, new, fp8 / oldfp8 (the new / old build with --precision fp8), or a --triton-options setting with ",=" as "+." and no "_".
BENCH_FILE = re.compile(r"bench_(?P<group>[a-z0-9]+)_(?P<build>[a-z0-9+.-]+)_r(?P<round>\d+)\.json$")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: (build, baseline) pairs whose mean medians ``bench_rows`` compares, as ``<build>_vs_<baseline>_pct``.
COMPARISONS = (("new", "old"), ("fp8", "new"), ("fp8", "oldfp8"), ("opt", "new"), ("optfp8", "fp8"), ("opt2", "new"),
               ("opt", "opt2"), ("optg", "opt"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def bench_rows(runs: Path) -> list[dict]:
    """One row per workload: ``{"workload", "old_r1", "new_r1", ...}`` medians (ms), the change and the spread."""
    table: dict[str, dict] = {}
    for path in sorted(runs.glob("bench_*.json")):
        match = BENCH_FILE.search(path.name)
        report = _load(path)
        if match is None or report is None:
            continue
        for run in report.get("runs", []):
            workload = f"{run['model']} views={run['views']} prompt={run['prompt_len']}"
            row = table.setdefault(workload, {"workload": workload})
            row[f"{match['build']}_r{match['round']}"] = round(float(run["median_ms"]), 3)
            peak = run.get("calls_peak_gpu_gib", run.get("peak_gpu_gib"))  # the calls' peak, not the load's
            if peak is not None:
                row[f"{match['build']}_peak_gib"] = round(peak, 2)
            if match["build"] == "new" and run.get("backend_options"):
                row["new_options"] = run["backend_options"]
        for failed in report.get("failed", []) + report.get("skipped", []):
            workload = f"{failed.get('model')} views={failed.get('views')} prompt={failed.get('prompt_len')}"
            row = table.setdefault(workload, {"workload": workload})
            row.setdefault("problems", []).append(f"{match['build']} r{match['round']}: {failed.get('reason')}")
    for row in table.values():
        medians = {build: [v for k, v in row.items() if k.startswith(f"{build}_r")]
                   for build in {name for pair in COMPARISONS for name in pair} | {"old"}}
        for build, base in COMPARISONS:
            if medians[build] and medians[base]:
                row[f"{build}_vs_{base}_pct"] = round(100.0 * (_mean(medians[build]) / _mean(medians[base]) - 1.0), 2)
        old = medians["old"]
        if len(old) > 1:
            row["old_spread_pct"] = round(100.0 * (max(old) / min(old) - 1.0), 2)
    order = {"pi0": 0, "pi05": 1, "openvla": 2, "rt2": 3}
    return sorted(table.values(), key=lambda r: (order.get(r["workload"].split()[0], 9), r["workload"]))


def verify_rows(runs: Path) -> dict:
    """Per verified model: passed, the final actions' ‖Δ‖/‖ref‖ and the failure text (if any)."""
    out = {}
    for path in sorted(runs.glob("verify_*.json")):
        report = _load(path)
        model = path.stem.removeprefix("verify_")
        if report is None:
            out[model] = {"passed": False, "failure": "no report (the step failed or timed out: see steps)"}
            continue
        actions = next((m for m in report.get("modules", []) if m.get("name") == "actions"), {})
        out[model] = {"passed": report.get("passed"), "actions_rel_l2": actions.get("rel_l2"),
                      "actions_cosine": actions.get("cosine"), "actions_vs_bf16": actions.get("vs_bf16"),
                      "modules": {m.get("name"): {k: m.get(k) for k in ("rel_l2", "cosine", "vs_bf16", "status")}
                                  for m in report.get("modules", [])},
                      "threshold": report.get("threshold_rel_l2"), "failure": report.get("failure"),
                      "backend_options": report.get("backend_options")}
    return out


def summarize(runs: Path) -> dict:
    steps = (runs / "steps.txt").read_text().splitlines() if (runs / "steps.txt").exists() else []
    tests = (runs / "gpu_tests.log").read_text().strip().splitlines() if (runs / "gpu_tests.log").exists() else []
    return {
        "builds": _load(runs / "builds.json"),
        "bench": bench_rows(runs),
        "verify": verify_rows(runs),
        "gpu_tests": tests[-1] if tests else None,
        "steps": steps,
        "problems": [line for line in steps if not line.startswith("ok ")],
    }


def print_summary(summary: dict) -> None:
    rounds = sorted({k for row in summary["bench"] for k in row if re.fullmatch(r"[a-z0-9+.-]+_r\d+", k)},
                    key=lambda k: (k[-1], {"old": 0, "new": 1}.get(k.split("_r")[0], 2), k))
    print(f"{'workload':28}" + "".join(f"{k:>10}" for k in rounds) + f"{'new/old':>9}{'fp8/new':>9}{'fp8/oldfp8':>11}"
          f"{'old spread':>11}{'peak GiB new/fp8':>18}")
    for row in summary["bench"]:
        cells = "".join(f"{row[k]:>10.2f}" if k in row else f"{'-':>10}" for k in rounds)
        change = f"{row['new_vs_old_pct']:+8.1f}%" if "new_vs_old_pct" in row else f"{'-':>9}"
        fp8 = f"{row['fp8_vs_new_pct']:+8.1f}%" if "fp8_vs_new_pct" in row else f"{'-':>9}"
        fp8_change = f"{row['fp8_vs_oldfp8_pct']:+10.1f}%" if "fp8_vs_oldfp8_pct" in row else f"{'-':>11}"
        spread = f"{row['old_spread_pct']:10.1f}%" if "old_spread_pct" in row else f"{'-':>11}"
        peaks = "/".join(f"{row[k]:.2f}" if k in row else "-" for k in ("new_peak_gib", "fp8_peak_gib"))
        opt = f"   opt/new {row['opt_vs_new_pct']:+.1f}%" if "opt_vs_new_pct" in row else ""
        opt += f"   optfp8/fp8 {row['optfp8_vs_fp8_pct']:+.1f}%" if "optfp8_vs_fp8_pct" in row else ""
        opt += f"   opt2/new {row['opt2_vs_new_pct']:+.1f}%" if "opt2_vs_new_pct" in row else ""
        opt += f"   opt/opt2 {row['opt_vs_opt2_pct']:+.1f}%" if "opt_vs_opt2_pct" in row else ""
        print(f"{row['workload']:28}{cells}{change}{fp8}{fp8_change}{spread}{peaks:>18}{opt}")
    for model, result in summary["verify"].items():
        err = result.get("actions_rel_l2")
        print(f"verify {model}: {'PASS' if result.get('passed') else 'FAIL'}"
              + ("" if err is None else f", final actions rel err {err:.3e}")
              + ("" if result.get("passed") else f" ({result.get('failure')})"))
    print(f"GPU tests: {summary['gpu_tests']}")
    for problem in summary["problems"]:
        print(f"problem: {problem}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    runs, out = Path(argv[0]), Path(argv[1])
    summary = summarize(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

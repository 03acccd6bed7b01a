"""Warp-stall samples of the persistent expert layer, phase by phase, from an Nsight Compute source page.

Reads the SASS page that ``ncu -i expert.ncu-rep --page source --csv --print-source sass`` writes for one launch of
``_expert_layer_kernel`` (``benchmarks/micro_expert_layer.py --ncu``) and splits the instructions at the grid
barriers: each barrier's arrival compiles to a ``MEMBAR.ALL.GPU``, so the k-th one ends phase k (the attention's
merge adds one more, before the atomic of its last-arriver count). Samples in a barrier's poll loop (the strong
load of its counter and the compare after it; the loop opens the segment after the fence) are programs done with
the phase before, waiting for the others: they are counted as that phase's ``waiting`` samples, the rest as its
``working`` samples. Prints, per phase, both shares and the top stall reasons of its work; writes JSON with
``--out``. With ``--whole`` (any kernel, e.g. the step kernel of ``micro_expert_layer.py --ncu --step``, whose
layers run one code in a loop): the stall reasons summed over all instructions, the samples in barrier polls, and
the samples of each acquire barrier's window against those of the code segment before it.

    python benchmarks/ncu_phase_stalls.py ncu_sass.csv [--whole] [--out phases.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

#: Names of the segments between barrier fences of the one-layer kernel (a middle layer: pending residual, no
#: final row phase), in order.
PHASES = ("0 residual + attention norm", "1 QKV + RoPE", "2 attention", "2b merge of key ranges", "3 o partials",
          "4 residual + MLP norm", "5 gate/up + GELU", "6 down partials")
SAMPLES = "Warp Stall Sampling (All Samples)"


def read_sass(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(path.open()))
    start = next(i for i, row in enumerate(rows) if row and row[0] == "Address")
    return rows[start], rows[start + 1:]


def _columns(header: list[str]):
    """The source page's column index by name, its stall-reason columns, and ``count(row, column)`` (0 where a row
    has no number there)."""
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def count(row, name):
        try:
            return int(row[col[name]])
        except (ValueError, IndexError):
            return 0

    return col, reasons, count


def phase_stalls(header: list[str], rows: list[list[str]]) -> list[dict]:
    col, reasons, count = _columns(header)

    fences = [i for i, row in enumerate(rows) if "MEMBAR.ALL.GPU" in row[col["Source"]]]
    if len(fences) != len(PHASES) - 1:
        raise SystemExit(f"expected {len(PHASES) - 1} grid-barrier fences (a middle layer's launch), found "
                         f"{len(fences)}: profile launch 1 of a step (ncu --launch-skip 1)")
    bounds = [0, *fences, len(rows)]
    total = sum(count(row, SAMPLES) for row in rows)
    polls = {i for i, row in enumerate(rows) if "LDG.E.STRONG.SYS" in row[col["Source"]]}
    polls |= {i + 1 for i in polls}
    segments = list(zip(bounds, bounds[1:]))
    result = []
    for j, (name, (lo, hi)) in enumerate(zip(PHASES, segments)):
        work = [i for i in range(lo, hi) if i not in polls]
        working = sum(count(rows[i], SAMPLES) for i in work)
        after = segments[j + 1] if j + 1 < len(segments) else (hi, hi)
        waiting = sum(count(rows[i], SAMPLES) for i in range(*after) if i in polls)
        by_reason = {r[len("stall_"):]: sum(count(rows[i], r) for i in work) for r in reasons}
        top = dict(sorted(((k, v) for k, v in by_reason.items() if v), key=lambda kv: -kv[1])[:5])
        result.append(dict(phase=name, working_samples=working, waiting_samples=waiting, working_share=working / total,
                           waiting_share=waiting / total, top_stalls_working=top))
    return result


def whole_kernel_stalls(header: list[str], rows: list[list[str]]) -> dict:
    """Every stall reason's samples over all instructions, largest first, and the samples on the instructions of
    grid-barrier polls (a strong or acquire load of a counter and the instruction after it)."""
    col, reasons, count = _columns(header)

    source = [row[col["Source"]] for row in rows]
    polls = {i for i, text in enumerate(source) if "LDG.E.STRONG" in text}
    polls |= {i + 1 for i in polls}
    by_reason = {r[len("stall_"):]: sum(count(row, r) for row in rows) for r in reasons}
    total = sum(count(row, SAMPLES) for row in rows)
    # The step kernel's barriers (acquire polls): each is a fence, the arrival, then a poll loop in which thread 0
    # reads the counter (``CCTL.IVALL`` after each acquire load) and the other warps wait at a CTA barrier, and a
    # shared-memory load of the value after it; a window runs from the fence before a pair of ``CCTL.IVALL`` to
    # that load. The segments between windows are the phases, in code order.
    cctl = [i for i, text in enumerate(source) if "CCTL.IVALL" in text]
    windows = []
    for first, second in zip(cctl[::2], cctl[1::2]):
        lo = first
        while lo > 0 and "MEMBAR" not in source[lo] and first - lo < 40:
            lo -= 1
        hi = second
        while hi < len(source) - 1 and hi - second < 12:
            hi += 1
            if "LDS" in source[hi] and "[UR" in source[hi]:
                break
        windows.append((lo, hi))
    segments, start = [], 0
    for lo, hi in windows:
        segments.append(dict(instructions=[start, lo], working_share=sum(count(r, SAMPLES) for r in rows[start:lo]) / total,
                             barrier_share=sum(count(r, SAMPLES) for r in rows[lo:hi + 1]) / total,
                             hgmma=sum("HGMMA" in t for t in source[start:lo]),
                             ldgsts=sum("LDGSTS" in t for t in source[start:lo])))
        start = hi + 1
    return dict(samples=total, poll_samples=sum(count(rows[i], SAMPLES) for i in polls if i < len(rows)),
                instructions=len(rows),
                barrier_window_share=sum(seg["barrier_share"] for seg in segments),
                segments=segments,
                stalls=dict(sorted(((k, v) for k, v in by_reason.items() if v), key=lambda kv: -kv[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sass_csv", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--whole", action="store_true",
                        help="stall reasons over the whole kernel instead of per phase of the one-layer kernel")
    args = parser.parse_args()
    if args.whole:
        result = whole_kernel_stalls(*read_sass(args.sass_csv))
        total = sum(result["stalls"].values())
        print(f"{result['samples']} warp-stall samples over {result['instructions']} SASS instructions, "
              f"{result['poll_samples'] / max(result['samples'], 1):.0%} in grid-barrier polls")
        for reason, n in result["stalls"].items():
            print(f"  {reason:<28} {n:8d} {n / max(total, 1):6.1%}")
        print(f"{result['barrier_window_share']:.1%} of the samples in acquire-barrier windows; by segment (code order):")
        for seg in result["segments"]:
            lo, hi = seg["instructions"]
            print(f"  instructions {lo:5d}-{hi:5d}: working {seg['working_share']:6.1%}, then the barrier "
                  f"{seg['barrier_share']:6.1%} ({seg['hgmma']} HGMMA, {seg['ldgsts']} LDGSTS)")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    phases = phase_stalls(*read_sass(args.sass_csv))
    working = sum(p["working_samples"] for p in phases)
    waiting = sum(p["waiting_samples"] for p in phases)
    total = working + waiting
    print(f"{total} warp-stall samples in the phases: {waiting / total:.0%} waiting at grid barriers")
    print(f"{'phase':<28} {'working':>8} {'waiting after':>14}  top stalls while working")
    for p in phases:
        reasons = ", ".join(f"{k} {v}" for k, v in p["top_stalls_working"].items())
        print(f"{p['phase']:<28} {p['working_share']:8.1%} {p['waiting_share']:14.1%}  {reasons}")
    if args.out:
        args.out.write_text(json.dumps(dict(samples=total, waiting_samples=waiting, phases=phases), indent=1))


if __name__ == "__main__":
    main()

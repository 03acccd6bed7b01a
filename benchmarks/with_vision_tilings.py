"""Run a ``cortexflow`` command with ``triton_encoder.VISION_GEMM_TILINGS`` taken from a JSON file (what
``micro_gemm_shapes.py --tilings-out`` writes: ``{"N,K": GemmTiling fields}``), so that a device call can time
``--triton-options vision_gemm=triton`` with the tilings its own sweep chose.

    python benchmarks/with_vision_tilings.py TILINGS.json bench --models pi0 ... --triton-options vision_gemm=triton
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.backends import triton_encoder  # noqa: E402
from cortexflow.kernels.gemm import GemmTiling  # noqa: E402


def main() -> None:
    table = json.loads(Path(sys.argv[1]).read_text())
    triton_encoder.VISION_GEMM_TILINGS.update(
        {tuple(int(v) for v in key.split(",")): GemmTiling(**fields) for key, fields in table.items()})
    print(f"VISION_GEMM_TILINGS: {triton_encoder.VISION_GEMM_TILINGS}", file=sys.stderr)
    from cortexflow.cli import app

    sys.argv = ["cortexflow", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()

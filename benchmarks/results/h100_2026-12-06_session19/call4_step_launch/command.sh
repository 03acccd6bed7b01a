export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_expert_layer.py tests/test_expert_step.py tests/test_fp8_gemm.py tests/test_precision.py tests/test_fp8_token_decoder.py -k "fp8 or step or bit_for_bit or backend" > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
for r in 1 2; do for o in default expert_launch=step; do
  tag=$([ $o = default ] && echo layer || echo step)
  extra=(); [ $o != default ] && extra=(--triton-options $o)
  timeout 60 python3 -m cortexflow.cli bench --backends triton --graphs on --iters 50 --warmup 5 --models pi0 --views 1,2,3 --prompt-len 20 "${extra[@]}" --json $OUT/bench_pi0_${tag}_r$r.json > /dev/null 2>&1
  timeout 60 python3 -m cortexflow.cli bench --backends triton --graphs on --iters 50 --warmup 5 --models pi05 --views 2 --prompt-len 20,60 "${extra[@]}" --json $OUT/bench_pi05_${tag}_r$r.json > /dev/null 2>&1
done; done
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/bench_*.json")):
    for r in json.load(open(f)).get("runs", []): print(os.path.basename(f), r["model"], r["views"], r["prompt_len"], round(r["median_ms"], 2))
PY
timeout 200 python3 benchmarks/bench_fp8_decode.py --out $OUT/bench_fp8_decode_gated_down.json --shapes gate_up,down --skip prefill 2>&1 | tail -30

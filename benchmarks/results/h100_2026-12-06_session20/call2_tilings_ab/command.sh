# device call of session 20 (H100 80GB HBM3): GPU tests, the expert attention's logit parts, the FP8 gate/up and
# down decode-GEMV sweep, and the Pi0 / Pi0.5 A/B of 659de57 (prefix K/V with room) against e81c1c7
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 80 python3 -m pytest -q -x tests/test_expert_layer.py tests/test_triton_encoder.py tests/test_precision.py -k "parts or real_size or room or host" > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
OUT=$R/m1 timeout 100 python3 benchmarks/micro_expert_layer.py --only logits --phases-of "attention logits in 4 parts" > $R/micro_logits.log 2>&1; echo "micro logits rc $?" >> $R/steps.txt
timeout 150 python3 benchmarks/bench_fp8_decode.py --sweep fp8 --shapes gate_up,down --skip prefill --out $R/gemv.json > $R/gemv.log 2>&1; echo "gemv rc $?" >> $R/steps.txt
OUT=$OUT/ab ITERS=50 BUILDS="old new" GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1 2" VERIFY=pi0 SKIP_TESTS=1 BUDGET=230 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; echo "ab rc $?" >> $R/steps.txt
cd $OUT && tar czf results.tgz r && cp r/steps.txt r/micro_logits.log r/gemv.log r/tests.log . ; ls $OUT $OUT/ab

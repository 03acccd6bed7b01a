# Device call 2 of session 30: ExpertTiling's defaults changed to call 1's fastest step-kernel tiling (attn_rows=64,
# attn_merge="phase", attn_v_parts=4, attn_d_parts=1; new = the working tree of this call, on top of b257d2c;
# old_build.tar = `git archive b257d2c`, the same code with the 16-row last-arriver default).
# 1. The GPU tests at real size (the new default) and of the merge phase. 2. Two rounds of the one-layer and step
# kernels at the new default and the previous one (micro_expert_layer.py --step). 3. Whole predict, Pi0 1/2/3 views
# and Pi0.5 prompt 20/60, two interleaved rounds of 100 calls, verify Pi0 and Pi0.5 at real size.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
timeout 80 python3 -m pytest -q tests/test_expert_layer.py tests/test_expert_step.py -k "real_size or merge" > $OUT/tests.log 2>&1; tail -2 $OUT/tests.log
for r in 1 2; do mkdir -p $OUT/micro_r$r; OUT=$OUT/micro_r$r timeout 65 python3 benchmarks/micro_expert_layer.py --only "16 rows, last-arriver" --step --no-phases > $OUT/micro_r$r/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro_r$r/micro.log; done
BUILDS="old new" GROUPS_TO_BENCH="pi0 pi05" VERIFY="pi0 pi05" ROUNDS="1 2" ITERS=100 BUDGET=300 SKIP_TESTS=1 OUT=$OUT/grid timeout 320 bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -14

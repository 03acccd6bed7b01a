# Device call 3 of session 30: call 2's tiling with the logits in 2 column parts (attn_rows=64, attn_merge="phase",
# attn_v_parts=4, attn_d_parts=2), where Pi0's Euler step kernel compiled for sm_90 has no spill beyond the old
# default's (32 B stack, 80 local instructions, against 56 B / 89 with one part). new = the working tree of this
# call, on top of b257d2c; old_build.tar = `git archive b257d2c` (the 16-row last-arriver default).
# 1. The step and one-layer kernels at the new default, the old one and call 2's (micro_expert_layer.py --step).
# 2. Whole predict, Pi0 1/2/3 views and Pi0.5 prompt 20/60, two interleaved rounds of 100 calls, verify both.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
mkdir -p $OUT/micro; OUT=$OUT/micro timeout 90 python3 benchmarks/micro_expert_layer.py --only "16 rows, last-arriver" --only "logits in 1 part" --step --no-phases > $OUT/micro/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro/micro.log
BUILDS="old new" GROUPS_TO_BENCH="pi0 pi05" VERIFY="pi0 pi05" ROUNDS="1 2" ITERS=100 BUDGET=300 SKIP_TESTS=1 OUT=$OUT/grid timeout 320 bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -9

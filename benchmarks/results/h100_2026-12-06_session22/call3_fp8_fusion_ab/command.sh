# device call 3 of session 22 (new build = commit 66a40b8; old = old_build.tar = 47c1d2b, the session's start; the device
# copy's git HEAD is stale): (a) GPU tests of the FP8 GEMM kernels, the FP8 token decoder and the expert layer's
# merge phase; (b) micro_expert_layer: the key-range merge as a phase of its own (16/32/64-row attention tiles),
# QKV in 160 items, with the merge phase's phases; (c) token VLAs old / new / oldfp8 / fp8 (FP8 product scales
# applied by QKV/RoPE and the gated activation, rstd from the quantisation launch), two interleaved rounds,
# verify OpenVLA and RT-2 with --precision fp8; (d) a profile of OpenVLA FP8 (new build). The Pi0 family's
# default path is unchanged (the merge phase is off by default: the same compiled kernel), so not benched.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/call3; rm -rf $R; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call3.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gemm.py tests/test_fp8_token_decoder.py tests/test_expert_layer.py -k "not test_expert_layer or merge" > $R/tests.log 2>&1; pack tests $?
OUT=$R timeout 110 python3 benchmarks/micro_expert_layer.py --only "merge phase" --only "attention 64 rows" --only "pair 8" --no-phases --phases-of "merge phase" > $R/micro_expert.log 2>&1; pack micro_expert $?
OUT=$R/ab ITERS=30 BUILDS="old new oldfp8 fp8" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY= VERIFY_FP8="openvla rt2" SKIP_TESTS=1 BUDGET=200 timeout 225 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
timeout 70 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --precision fp8 --top 30 --json $R/profile_openvla_fp8.json > $R/profile_openvla_fp8.txt 2>&1; pack profile_fp8 $?

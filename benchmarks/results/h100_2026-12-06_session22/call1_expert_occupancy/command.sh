# device call 1 of session 22 (build = commit 24686b8; the device copy's git HEAD is stale):
# (a) GPU tests of the persistent expert layer at real size, one and two programs an SM;
# (b) micro_expert_layer: the default tiling vs two programs an SM (alone and with smaller GEMM items), phases;
# (c) whole predict, this build (new) vs this build with expert_programs_per_sm=2 (opt), Pi0 1/2/3 views and
#     Pi0.5 prompt 20/60, two rounds; (d) the OpenVLA decode attention sweep; (e) OpenVLA's decode GEMVs on
#     1/2/4 persistent programs per SM. Results in R (outside OUT), packed into OUT/call1.tgz after every step.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/call1; mkdir -p $R
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call1.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_expert_layer.py -k "real_size or cannot_hold" > $R/tests.log 2>&1; pack tests $?
OUT=$R timeout 100 python3 benchmarks/micro_expert_layer.py --only 2/SM --no-phases --phases-of "2/SM, all three" > $R/micro_expert.log 2>&1; pack micro_expert $?
OUT=$R/ab ITERS=50 BUILDS="new opt" OPT_OPTIONS=expert_programs_per_sm=2 GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=200 timeout 230 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
OUT=$R timeout 60 python3 benchmarks/micro_decoder_kernels.py openvla > $R/micro_attention.log 2>&1; pack attention $?
timeout 50 python3 benchmarks/micro_persistent_gemv.py --out $R/persistent_gemv.json > $R/persistent_gemv.log 2>&1; pack persistent_gemv $?

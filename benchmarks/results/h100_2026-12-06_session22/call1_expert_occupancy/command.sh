# device call 1 of session 22 (build = commit 24686b8; the device copy's git HEAD is stale):
# (a) GPU tests of the persistent expert layer at real size, one and two programs an SM;
# (b) micro_expert_layer: the default tiling vs two programs an SM (alone and with smaller GEMM items), phases;
# (c) whole predict, this build (new) vs this build with expert_programs_per_sm=2 (opt), Pi0 1/2/3 views and
#     Pi0.5 prompt 20/60, two rounds; (d) the OpenVLA decode attention sweep; (e) OpenVLA's decode GEMVs on
#     1/2/4 persistent programs per SM. Everything lands in R and is packed into call1.tgz.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_expert_layer.py -k "real_size or cannot_hold" > $R/tests.log 2>&1; echo "tests rc $?" >> $R/steps.txt
OUT=$R timeout 110 python3 benchmarks/micro_expert_layer.py --only 2/SM --no-phases --phases-of "2/SM, all three" > $R/micro_expert.log 2>&1; echo "micro expert rc $?" >> $R/steps.txt
cp $R/steps.txt $OUT/
OUT=$R/ab ITERS=50 BUILDS="new opt" OPT_OPTIONS=expert_programs_per_sm=2 GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=230 timeout 260 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; echo "ab rc $?" >> $R/steps.txt
cp $R/steps.txt $R/ab/summary.txt $OUT/ 2>/dev/null
OUT=$R timeout 70 python3 benchmarks/micro_decoder_kernels.py openvla > $R/micro_attention.log 2>&1; echo "attention rc $?" >> $R/steps.txt
timeout 60 python3 benchmarks/micro_persistent_gemv.py --out $R/persistent_gemv.json > $R/persistent_gemv.log 2>&1; echo "persistent rc $?" >> $R/steps.txt
tar czf $OUT/call1.tgz -C $R . && cp $R/steps.txt $OUT/ && rm -rf $R

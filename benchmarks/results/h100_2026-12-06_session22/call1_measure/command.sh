# device call 1 of session 22 (build = commit 6830425; the device copy's git HEAD is stale):
# (a) the OpenVLA decode attention sweep (key steps x ranges x warps, K/V hot and cycled past L2);
# (b) session 21's confirmation A/B: old = 08e148b vs this build, token VLAs in bf16, two rounds;
# (c) OpenVLA's decode GEMVs on 1/2/4 persistent programs per SM; (d) profiles of OpenVLA, FP8 and bf16.
# Everything lands in R and is packed into call1.tgz at the end (the device tool returns at most 8 files).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
OUT=$R timeout 110 python3 benchmarks/micro_decoder_kernels.py openvla > $R/micro_attention.log 2>&1; echo "attention rc $?" >> $R/steps.txt
OUT=$R/ab ITERS=30 BUILDS="old new" GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=160 timeout 190 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; echo "ab rc $?" >> $R/steps.txt
timeout 100 python3 benchmarks/micro_persistent_gemv.py --out $R/persistent_gemv.json > $R/persistent_gemv.log 2>&1; echo "persistent rc $?" >> $R/steps.txt
timeout 85 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --precision fp8 --top 30 --json $R/profile_openvla_fp8.json > $R/profile_openvla_fp8.txt 2>&1; echo "profile fp8 rc $?" >> $R/steps.txt
timeout 75 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --top 30 --json $R/profile_openvla.json > $R/profile_openvla.txt 2>&1; echo "profile bf16 rc $?" >> $R/steps.txt
tar czf $OUT/call1.tgz -C $R . && cp $R/steps.txt $OUT/ && rm -rf $R

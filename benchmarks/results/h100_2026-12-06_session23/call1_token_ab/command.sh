# device call 1 of session 23 (new build = commit 603d118; old = old_build.tar = 47c1d2b, session 22's start; the device
# copy's git HEAD is stale). Times session 22's untimed ViT change (row-major residual stream, residual adds in the
# LayerNorm kernel), this session's FP8 o-scaling in gate/up's quantisation launch and the decode attention's L2
# prefetch of the o weight (opt = decode_o_prefetch=all); each step packs OUT/call1.tgz:
# (1) GPU tests: FP8 GEMM kernels (incl. the quantise-the-sum launch), FP8 token decoder, L2 prefetch, PDL chains,
#     the towers' LayerNorm paths;
# (2) relcheck.py: test_fp8_token_decoder's relative errors on the GPU, new and old build (call 3 of session 22 had
#     the decode_gemv-off route at 9.36e-2 against its then 8e-2 bound);
# (3) the token VLAs old / new / oldfp8 / fp8 / opt / optfp8, two interleaved rounds, verify OpenVLA bf16 and fp8;
# (4) bench_openvla: the prefetch at half / all of the o weight, bf16 and fp8, same process;
# (5) a profile of OpenVLA bf16 (new build).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
REPO=$PWD; R=/tmp/s23call1; rm -rf $R /tmp/old; mkdir -p $R /tmp/old && tar -xf old_build.tar -C /tmp/old
pack() { echo "$1 rc $2" >> $R/steps.txt; tar czf $OUT/call1.tgz -C $R . ; cp $R/steps.txt $OUT/; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gemm.py tests/test_fp8_token_decoder.py tests/test_l2_prefetch.py tests/test_pdl.py tests/test_triton_kernels.py tests/test_openvla.py -k "fp8 or product or prefetch or chain or add_layer_norm or row_major or triton_backend_matches or tower_matches" > $R/tests.log 2>&1; pack tests $?
RC=benchmarks/results/h100_2026-12-06_session23/call1_token_ab/relcheck.py
echo "new build" > $R/relcheck.txt; timeout 30 python3 $REPO/$RC >> $R/relcheck.txt 2>&1
echo "old build (47c1d2b)" >> $R/relcheck.txt; (cd /tmp/old && PYTHONPATH=/tmp/old timeout 30 python3 $REPO/$RC >> $R/relcheck.txt 2>&1); pack relcheck $?
OUT=$R/ab ITERS=30 BUILDS="old new oldfp8 fp8 opt optfp8" OPT_OPTIONS=decode_o_prefetch=all GROUPS_TO_BENCH="token" ROUNDS="1 2" VERIFY=openvla VERIFY_FP8=openvla SKIP_TESTS=1 BUDGET=280 timeout 300 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; pack ab $?
cp $R/ab/summary.txt $OUT/ 2>/dev/null
timeout 70 python3 benchmarks/bench_openvla.py --triton-only --iters 30 --json $R/prefetch_sweep.json --triton-options half=decode_o_prefetch=half --triton-options all=decode_o_prefetch=all --triton-options fp8=fp8=decoder --triton-options fp8half=fp8=decoder,decode_o_prefetch=half --triton-options fp8all=fp8=decoder,decode_o_prefetch=all > $R/prefetch_sweep.log 2>&1; pack sweep $?
timeout 50 python3 -m cortexflow.cli profile --model openvla --backend triton --size real --top 40 --json $R/profile_openvla.json > $R/profile_openvla.txt 2>&1; pack profile $?

# device call 2 of session 23, on the machine call 1 left warm (new build = commit 603d118; old = old_build.tar =
# 47c1d2b): the Pi0 family old / new, two interleaved rounds (the attention kernel had gained the L2-prefetch
# arguments, off here). Run as one command line:
export PYTHONPATH=$PWD; R=/tmp/s23call2; rm -rf $R; mkdir -p $R; OUT=$R/ab ITERS=30 BUILDS="old new" GROUPS_TO_BENCH="pi0 pi05" ROUNDS="1 2" VERIFY= SKIP_TESTS=1 BUDGET=250 timeout 270 bash benchmarks/gpu_triton_check.sh final old_build.tar > $R/ab.log 2>&1; echo rc $?; cp $R/ab/summary.txt $OUT/; tar czf $OUT/call2.tgz -C $R .

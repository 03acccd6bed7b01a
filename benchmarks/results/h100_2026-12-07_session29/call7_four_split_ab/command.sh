# Device call 7 of session 29: whole predict with ExpertTiling's defaults changed to out_cols=16, o_splits=4, down_splits=4
# (new: the working tree of this call, not committed; old_build.tar = `git archive` of the commit adding call 5's script),
# Pi0 1/2/3 views, two interleaved rounds of 100 calls, verify Pi0 at real size.
export PYTHONPATH=$PWD; BUILDS="old new" GROUPS_TO_BENCH="pi0" VERIFY="pi0" ROUNDS="1 2" ITERS=100 BUDGET=150 SKIP_TESTS=1 OUT=$OUT timeout 170 bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -8

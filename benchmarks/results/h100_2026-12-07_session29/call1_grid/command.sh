# Device call 1 of session 29 (written in session 28 as its call 2; new build = 8b1f8d7, old_build.tar = `git archive fe0157d`,
# session 27's HEAD; the device copy's git HEAD is stale). On nvidia-h100-x1.
# Sets: old = session 27's defaults (expert_launch=layer, SigLIP GELU kernel); new = this build's defaults (euler, GELU
# epilogue, text table on the host); opt = new with the text table on the GPU (--token-embedding device); fp8 = new with
# --precision fp8. Pi0 1/2/3 views and Pi0.5 prompt 20/60, two interleaved rounds of 100 calls; verify Pi0, Pi0.5 (bf16)
# and Pi0 (fp8) at real size.
export PYTHONPATH=$PWD; BUILDS="old new opt fp8" GROUPS_TO_BENCH="pi0 pi05" VERIFY="pi0 pi05" VERIFY_FP8="pi0" OPT_ARGS="--token-embedding device" ITERS=100 BUDGET=550 SKIP_TESTS=1 OUT=$OUT bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -60

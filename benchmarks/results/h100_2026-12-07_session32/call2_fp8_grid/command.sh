# Session 32, call 2: the FP8 expert's new default tiling (default_tiling(fp8=True)) against session 31's end
# (old_build.tar = git archive 34b6e1e), whole predict with --precision fp8, two interleaved rounds of 100 calls:
# Pi0 1/2/3 views, Pi0.5 prompts 20 and 60; real-size verify --precision fp8 of Pi0 and Pi0.5 with the new build.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
cat $OUT/machine.txt
mkdir -p $OUT/grid
OUT=$OUT/grid BUDGET=520 BUILDS="oldfp8 fp8" GROUPS_TO_BENCH="pi0 pi05" VERIFY="" VERIFY_FP8="pi0 pi05" \
  ROUNDS="1 2" ITERS=100 SKIP_TESTS=1 bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -30

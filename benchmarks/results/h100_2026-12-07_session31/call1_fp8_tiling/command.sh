# Device call 1 of session 31. new = the working tree: the FP8 expert's own default tiling (kernels/expert_layer.py
# FP8_TILING: pair=8, block_k=64, num_stages=2; bf16 unchanged); old_build.tar = `git archive 22b8b4b` (session 30's end).
# 1. micro_expert_layer.py --step --fp8: the one-layer and step kernels, bf16 and E4M3 weights, at the default, the
#    at-once merge of session 30 and the low-spill tilings.
# 2. Whole predict with --precision fp8, new against old: Pi0 1/2/3 views and Pi0.5 prompt 20/60, two interleaved rounds
#    of 100 calls; real-size verify --precision fp8 of Pi0 and Pi0.5 with the new build.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/machine.txt
mkdir -p $OUT/micro; OUT=$OUT/micro timeout 230 python3 benchmarks/micro_expert_layer.py --step --fp8 --no-phases --only "merge at once" --only ", 2 stages" > $OUT/micro/micro.log 2>&1; grep -E "^(persistent|step kernel)" $OUT/micro/micro.log | head -40
BUILDS="oldfp8 fp8" GROUPS_TO_BENCH="pi0 pi05" VERIFY="" VERIFY_FP8="pi0 pi05" ROUNDS="1 2" ITERS=100 BUDGET=330 SKIP_TESTS=1 OUT=$OUT/grid timeout 345 bash benchmarks/gpu_triton_check.sh final old_build.tar 2>&1 | tail -12

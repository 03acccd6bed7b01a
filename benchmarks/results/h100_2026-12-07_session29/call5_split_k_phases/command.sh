# Device call 5 of session 29 (build = the commit adding this file; the device copy's git HEAD is stale). The premise of
# an expert layer without its two row phases (NOTES, session 29): can the o and down phases run without split-K (each
# program owning whole output columns, so its epilogue could add the residual) at about the time of today's 8-split
# phase? micro_expert_layer.py: the one-layer persistent kernel at real size, 18 layers a step in a CUDA graph, o/down at
# 64-column tiles x 8 K ranges (default, 128 items), 32-column tiles x 4 / 2 / 1 (128 / 64 / 32 items); each phase alone
# (others masked, barriers run) for the default and the 2- and 1-split tilings.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $OUT/machine.txt
timeout 230 python3 benchmarks/micro_expert_layer.py --only "32-col tiles" --phases-of "o/down 32-col tiles x 1 split" \
  --phases-of "o/down 32-col tiles x 2 splits" --phase barriers --phase "3 o" --phase "6 down" \
  > $OUT/micro.log 2>&1; echo "rc $?" >> $OUT/micro.log; tail -25 $OUT/micro.log

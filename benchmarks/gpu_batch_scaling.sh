#!/usr/bin/env bash
# Batch-scaling study on the GPU machine (issue 4): each encoder on the GPU (PyTorch; Triton too for the
# SigLIP tower) and on the same machine's CPU (PyTorch vs ONNX Runtime's CPU provider), batch 1..6.
# JSON + PNG per run land in $OUT (PACK=1: one archive).
#   bash benchmarks/gpu_batch_scaling.sh                 # OUT=... to choose the folder
#   ENCODERS="siglip_tiny resnet18d" DEVICES=cpu bash benchmarks/gpu_batch_scaling.sh   # quick CPU smoke run
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT"
ENCODERS="${ENCODERS:-siglip vit_small_patch16_224 resnet18d}"; DEVICES="${DEVICES:-cuda cpu}"
BS=(python3 -m cortexflow.cli bench --batch-scaling --batches 1,2,3,4,5,6)
for device in $DEVICES; do
  for enc in $ENCODERS; do
    if [ "$device" = cuda ]; then
      backends=pytorch; case "$enc" in siglip*) backends=pytorch,triton;; esac
      args=(--iters 50 --warmup 5 --max-seconds 5); tag=gpu
    else
      backends=pytorch,onnx; args=(--iters 10 --warmup 1 --max-seconds 6); tag=host_cpu
    fi
    timeout 120 "${BS[@]}" --encoder "$enc" --backends "$backends" --device "$device" "${args[@]}" \
      --json "$OUT/${enc}_batch_scaling_${tag}.json" --png "$OUT/${enc}_batch_scaling_${tag}.png" 2>&1 | tail -20 \
      || echo "failed or timed out: $enc on $device"
  done
done
# PACK=1: one archive (the device tool returns at most 8 files).
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/batch_scaling.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/batch_scaling.tgz "$OUT/batch_scaling.tgz"
fi

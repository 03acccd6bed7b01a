# Device call 6 of session 29 (same build as call 5): call 5's faster tiling (o/down 32-column tiles x 4 K ranges) and
# the default, two more rounds of the one-layer persistent kernel at real size.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; for r in 1 2; do OUT=$OUT/r$r timeout 70 python3 benchmarks/micro_expert_layer.py --only "x 4 splits" --no-phases > /tmp/r$r.log 2>&1; mkdir -p $OUT/r$r; cp /tmp/r$r.log $OUT/r$r/micro.log; grep "^persistent" /tmp/r$r.log; done

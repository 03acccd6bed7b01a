# Device call 4 of session 30 (the working tree of call 3, plus the GPU small-config tilings stating the last-arriver
# merge): the expert layer and step GPU tests of the merge phase, the real-size layer at the new default and the Euler
# step.
export PYTHONPATH=$PWD; timeout 270 python3 -m pytest -q -p no:cacheprovider tests/test_expert_layer.py tests/test_expert_step.py -k "real_size or merge or euler" -rs 2>&1 | tail -15 | tee $OUT/tests.log

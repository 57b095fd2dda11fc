#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (the package is pure Python: run from the checkout):
# the GPU tests, the hard cases, and the overhead benchmark on the GPU. Logs go to ${OUT:-.}.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not clients" tests/test_gpu.py tests/test_hard_cases.py \
  tests/test_loss_at_init.py tests/test_step_signatures.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
timeout 240 python3 benchmarks/overhead.py --accelerator gpu --only suite --repeats 3 --json "$out/bench_gpu.json" \
  2>&1 | grep -v -i "warn" | tee "$out/bench_gpu.log" | tail -14

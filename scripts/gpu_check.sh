#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and this project installed (README), with no
# network: the tests that exercise the accelerator, then the benchmarks at a size that
# uses the card, ending in one table. Finishes in under 8 minutes on an H100.
#
#   bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --small    # a dry run on a CPU, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
small="${1:-}"

python - <<'PY'
import jax
print("JAX", jax.__version__, "devices:", jax.devices())
PY

# float32 matmuls at full precision: the tests compare with PyTorch to 1e-4, which
# TF32 (the GPU default) does not meet.
export JAX_DEFAULT_MATMUL_PRECISION=highest
export HF_HUB_OFFLINE=1
tests="tests/test_trace.py tests/test_transforms.py tests/test_generate.py tests/test_gradients.py \
tests/test_optimize.py tests/test_llama.py tests/test_gpt2.py tests/test_language.py tests/test_sharding.py \
tests/test_site_families.py"
timeout 300 python -m pytest -q -p no:cacheprovider -x $tests
tests_status=$?
unset JAX_DEFAULT_MATMUL_PRECISION

if [ "$small" = "--small" ]; then
  timeout 240 python scripts/gpu_bench.py --small --repeats 2
else
  timeout 240 python scripts/gpu_bench.py
fi
bench_status=$?

echo
echo "tests: exit $tests_status; benchmarks: exit $bench_status; $(( $(date +%s) - start )) s in all"
exit $(( tests_status || bench_status ))

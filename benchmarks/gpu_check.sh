#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (the GPU-kernels checks), from the repository root:
#
#   bash benchmarks/gpu_check.sh            # OUT=<folder> to choose where the logs and JSON go
#
# 1. installs hf_yoco (no dependencies) and the wheels carried in .whl/ (a GPU image can hold older packages than
#    CI: bring transformers, liger-kernel, fla-core and flash-linear-attention as pure-Python wheels, see README);
# 2. compiles every kernel for this GPU's architecture ahead of time (`python -m hf_yoco.kernels.aot`);
# 3. runs tests/kernels and tests/test_integrations.py on CUDA, then the `gpu`-marked model tests (forward,
#    generate, a Trainer step, bf16 numerics of the Triton vs PyTorch paths against fp32: numerics.jsonl);
# 4. times the kernels against their PyTorch references, SDPA, fla's chunk_simple_gla and flex_attention
#    (benchmarks/kernel_speed.py -> kernels/kernels.{json,md});
# 5. with MODEL_BENCH=1, the model benchmark at the paper's scale against a same-size Llama, eager and with static
#    caches + torch.compile (`hf-yoco bench --device cuda --dtype bfloat16 [--compile]` -> bench/, bench-compile/;
#    about 8 minutes each on an H100: a session of its own).
# Each step has its own time limit and the run goes on after a failure; the exit status says whether all passed.
# Without a GPU it still runs (kernels in the Triton interpreter, the gpu tests skipped, a --smoke benchmark),
# which is how it is checked before it is taken to a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
step() {  # step <seconds> <log name> <command...>: run with a time limit, keep the log, remember failures
    local seconds=$1 log=$2
    shift 2
    echo "== $* (limit ${seconds}s)" | tee -a "$OUT/$log"
    timeout "$seconds" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== FAILED ($rc): $*" | tee -a "$OUT/$log"; status=1; }
}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import hf_yoco" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/hf_yoco . || exit 1
    export PYTHONPATH=/tmp/hf_yoco${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
    python3 -m pip list 2>/dev/null | grep -iE "^(fla-core|flash-linear-attention|liger.kernel|peft|accelerate|hf-yoco) " || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    arch=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(major * 10 + minor)")
    known=$(python3 -c "from hf_yoco.kernels.aot import GPUS; print(' '.join(map(str, GPUS)))")
    [[ " $known " == *" $arch "* ]] || arch=90
    bench=()
else
    arch=90
    bench=(--smoke)
fi
step 300 aot.log env -u TRITON_INTERPRET python3 -m hf_yoco.kernels.aot --archs "$arch" --json "$OUT/aot.json"
step 420 tests.log python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_integrations.py \
    --deselect tests/kernels/test_aot_compile.py
step 420 tests.log env HF_YOCO_GPU_REPORT="$OUT/numerics.jsonl" python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    tests/test_gpu.py
step 420 bench.log python3 benchmarks/kernel_speed.py "${bench[@]}" --out "$OUT/kernels"
rm -f "$OUT/bench.log"  # the tables are in kernels/kernels.md
if [ "${MODEL_BENCH:-0}" = 1 ]; then
    if [ ${#bench[@]} = 0 ]; then
        model_bench=(--device cuda --dtype bfloat16)
    else
        model_bench=(--preset gpu --smoke)
    fi
    step 600 model_bench.log python3 -m hf_yoco.cli bench "${model_bench[@]}" --output-dir "$OUT/bench"
    step 600 model_bench.log python3 -m hf_yoco.cli bench "${model_bench[@]}" --compile --output-dir "$OUT/bench-compile"
fi
echo "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILURES, see the logs) -> $OUT"
exit $status

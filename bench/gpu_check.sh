#!/usr/bin/env bash
# The GPU checks, prepared for a session that is lent a GPU machine (the `device` tool): one short run of every
# command's CUDA path on the zoo, and the real architectures' latency on the GPU. Not part of the test suite (CI
# has no GPU). Written in session 18 without a GPU to try it on: expect to fix what it finds.
#
#   here:  bash bench/gpu_check.sh prepare     # wheels the GPU image lacks, into .whl/ (git-ignored)
#   there: run(command="bash bench/gpu_check.sh run", carry=[".whl"], timeout_s=560)
#   here, the same commands on the CPU (to try the script): DEV=cpu PY=.venv/bin/python NO_WHEELS=1 ARCH=0 MP=no \
#          OUT=/tmp/gc bash bench/gpu_check.sh run
#
# The image's own huggingface_hub (1.33) serves diffusers and transformers: 2.x would need httpx2, which it lacks.
#
# What comes back under $OUT (8 files at most): log.txt (every command's output), the JSON files named below and
# one plot.
set -uo pipefail
mode=${1:-run}

if [ "$mode" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    for spec in diffusers==0.42.1 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 \
                typing-inspection==0.4.5 typing_extensions==4.16.0 regex==2026.12.2 transformers==5.23.0 typer==0.29.1 rich==15.0.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec" || echo "could not fetch $spec"
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
DEV=${DEV:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 DIFFSLIM_CACHE=${DIFFSLIM_CACHE:-/tmp/diffslim-cache}
D="$PY -m diffslim.cli"
fails=0
BUDGET=${BUDGET:-400}  # seconds: a step that would start later is skipped, so the call ends inside its limit
STEP_LIMIT=${STEP_LIMIT:-140}  # seconds one step may take
step() {  # step NAME COMMAND...: run it, log it, count a failure, go on
    local name=$1; shift
    if [ $SECONDS -ge $BUDGET ]; then echo "=== $name: skipped (budget of $BUDGET s spent)" | tee -a "$OUT/log.txt"; return; fi
    echo "=== $name: $*" | tee -a "$OUT/log.txt"
    local t0=$SECONDS
    if timeout $STEP_LIMIT "$@" >> "$OUT/log.txt" 2>&1; then echo "ok ($((SECONDS - t0)) s)" | tee -a "$OUT/log.txt"
    else echo "FAILED rc $? ($((SECONDS - t0)) s)" | tee -a "$OUT/log.txt"; fails=$((fails + 1)); fi
}
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/log.txt" 2>&1
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/log.txt"

# the cheap CUDA paths first, then the real architectures' latency (what a user's GPU would see), then the rest
step profile $D profile zoo:digits-sd --device $DEV --batch-size 16 --json
step sample $D sample zoo:digits-sd --device $DEV --n 8 --steps 20 --out /tmp/gc/sample
step evaluate-bf16 $D evaluate zoo:digits-dit --device $DEV --dtype bf16 --n 16 --json
if [ "${ARCH:-1}" != 0 ]; then
    step arch-sd15 $PY bench/arch_latency.py --config src/diffslim/configs/sd15-unet --device $DEV --dtype float16 \
        --height 512 --width 512 --batch 4 --rounds 10 --out "$OUT/arch_latency_sd15_h100_fp16.json"
    step arch-dit $PY bench/arch_latency.py --config src/diffslim/configs/dit-xl-2-256 --device $DEV \
        --dtype float16 --batch 16 --rounds 10 --no-plot --out "$OUT/arch_latency_dit-xl-2_h100_fp16.json"
fi
step depth-search $D depth-search zoo:digits-sd --device $DEV --n 8 --threshold 25 --json
step timesteps $D timesteps zoo:sr --device $DEV --steps 5 --n 4 --method greedy --json
step layer-prune $D layer-prune zoo:digits-dit --ratio 0.5 --device $DEV --out /tmp/gc/lp --json
step dipgo $D dipgo zoo:digits-dit --ratio 0.5 --iters 4 --select 2 --out /tmp/gc/dipgo.json
# dipgo:R (a pruner trained with the default iterations) is left out: the dipgo step runs its CUDA path
# zoo-train trains on Accelerate's device (this GPU): its batches, upsampler and EMA move there (session 30)
step zoo-train $D zoo-train sr --steps 4 --batch-size 8 --checkpoint-every 2 --out /tmp/gc/zt
# the distillation trainer's CUDA paths: mixed precision (fp16 with its gradient scaler; MP=no on a CPU try),
# gradient checkpointing, a checkpoint and its exact resume (the second run goes on from step 3 to 6), and bf16
step distill-mp $D distill zoo:digits-dit /tmp/gc/lp/model --data zoo --steps 3 --batch-size 16 --checkpoint-every 3 \
    --mixed-precision ${MP:-fp16} --gradient-checkpointing --out /tmp/gc/kd
step distill-resume $D distill zoo:digits-dit /tmp/gc/lp/model --data zoo --steps 6 --batch-size 16 --checkpoint-every 3 \
    --mixed-precision ${MP:-fp16} --gradient-checkpointing --out /tmp/gc/kd
step finetune-bf16 $D finetune zoo:digits-sd --depth 7 --steps 3 --batch-size 16 --mixed-precision bf16 --out /tmp/gc/ft
step bench-cuda sh -c "$D bench zoo:digits-sd --device $DEV --n 16 --methods full,steps:10,depth:9,layers:0.5,deepcache:3,dipgo:@bench/results/dipgo_digits-sd_recipe.json --json > $OUT/bench_digits-sd_cuda.json"
step workflow $D workflow zoo:digits-sd --device $DEV --stages layers:0.3,steps:20 --n 8 --out /tmp/gc/wf --json
step workflow-bf16 $D workflow zoo:digits-dit --device $DEV --dtype bf16 --stages layers:0.3,steps:20 --n 8 \
    --out /tmp/gc/wfb --json
step profile-pipeline $D profile zoo:sr --device $DEV --pipeline --n 4 --batch-size 4 --json
step profile-compiled $D profile zoo:digits-sd --device $DEV --batch-size 16 --compile --json
step bench-cuda-compiled sh -c "$D bench zoo:digits-dit --device $DEV --compile --n 16 --methods full,layers:0.5,dipgo:@bench/results/dipgo_digits-dit_recipe.json --json > $OUT/bench_digits-dit_cuda_compiled.json"
[ "${ARCH:-1}" = 0 ] && { echo "$fails failed" | tee -a "$OUT/log.txt"; exit $fails; }
step pipeline-share $PY bench/pipeline_share.py --device $DEV --dtype float16 --size 512 --steps 25 --batch 4 \
    --out "$OUT/pipeline_share_sd15_h100_fp16.json"
step arch-sd15-compiled $PY bench/arch_latency.py --config src/diffslim/configs/sd15-unet --device $DEV \
    --dtype float16 --height 512 --width 512 --batch 4 --rounds 10 --compile \
    --variants full,bk-sdm:base,bk-sdm:tiny,depth:9 --no-plot --out "$OUT/arch_latency_sd15_h100_fp16_compiled.json"
echo "$fails failed" | tee -a "$OUT/log.txt"
exit $fails

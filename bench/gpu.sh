#!/usr/bin/env bash
# The GPU throughput run, as one script that prints its JSON within about 8 minutes on one GPU (plus the
# eager-vs-compiled run, budgeted at 7 minutes: compilation is paid three times, see bench/compiled.py).
#
# The GPU machine has python3 with torch, torchvision, pillow, numpy, pyarrow, click and rich,
# but no network: the rest travels as wheels in .whl/ (make them here with bench/gpu_wheels.sh).
# Weights cannot be downloaded there either, so the models run from a seeded random state: the
# same compute as the pretrained weights. Results go to $OUT (or bench/results) as one JSON file.
#   MODELS  "name batch rounds" triples, ';'-separated (default ViT-B-32 and ViT-L-14)
#   DEVICE  default cuda; SAMPLES per shard (4 shards x 4 copies), default 1000
#   COMPILE "name batch rounds" of the eager-vs-compiled run (bench/compiled.py: model alone and task
#           path, each eager and compiled, interleaved; compile time cold and from the cache), default
#           "ViT-B-32 1024 2"; empty to skip. COMPILE_MODES: torch.compile modes to compare, default
#           "default" ("default reduce-overhead" adds CUDA graphs at the fixed batch)
# The decode runs above keep the eager forward (CLIPBATCH_COMPILE=0), as before, to stay comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-1000}
MODELS=${MODELS:-"ViT-B-32 1024 2;ViT-L-14 256 1"}
COMPILE=${COMPILE-"ViT-B-32 1024 2"}
COMPILE_MODES=${COMPILE_MODES:-default}
DAY=$(date +%Y-%m-%d)
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMI=$(command -v nvidia-smi || true)
[ -n "$SMI" ] && "$SMI" --query-gpu=name,driver_version,memory.total --format=csv

INPUT=$(mktemp -d)  # built once from the shipped photos, shared by every run
IFS=';' read -ra RUNS <<< "$MODELS"
for run in "${RUNS[@]}"; do
  read -r model batch rounds <<< "$run"
  pid=""
  if [ -n "$SMI" ]; then  # GPU utilisation every 200 ms beside the run
    "$SMI" --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$model-smi.csv" &
    pid=$!
  fi
  for decode in cpu device; do
    CLIPBATCH_COMPILE=0 CLIPBATCH_DECODE=$decode timeout 200 "$PY" -m bench.throughput --model "$model" --device "$DEVICE" \
      --batch-size "$batch" --input "$INPUT" --shards 4 --samples-per-shard "$SAMPLES" --max-side 512 --copies 4 --rounds "$rounds" \
      --skip-naive --out "$OUT/$DAY-h200.json" --label "$model-decode-$decode" || echo "$model (decode on $decode) failed: $?"
  done
  if [ -n "$pid" ]; then
    kill "$pid" || true
    awk -F', ' '{s+=$1; n++} END {if (n) printf "'"$model"': gpu utilisation mean %.1f%% over %d samples\n", s/n, n}' \
      "$OUT/$model-smi.csv"
  fi
done
if [ -n "$COMPILE" ]; then  # eager vs compiled in one run: bf16, the fixed batch, the same input
  read -r model batch rounds <<< "$COMPILE"
  for mode in $COMPILE_MODES; do
    CLIPBATCH_COMPILE_MODE=$mode timeout 420 "$PY" -m bench.throughput --model "$model" --device "$DEVICE" \
      --batch-size "$batch" --input "$INPUT" --shards 4 --samples-per-shard "$SAMPLES" --max-side 512 --copies 2 \
      --rounds "$rounds" --compile --out "$OUT/$DAY-h200.json" --label "$model-compile-$mode" \
      || echo "$model (compile, $mode) failed: $?"
  done
fi

#!/usr/bin/env bash
# The GPU throughput run, as one script that prints its JSON within about 8 minutes on one GPU.
#
# The GPU machine has python3 with torch, torchvision, pillow, numpy, pyarrow, click and rich,
# but no network: the rest travels as wheels in .whl/ (make them here with bench/gpu_wheels.sh).
# Weights cannot be downloaded there either, so the models run from a seeded random state: the
# same compute as the pretrained weights. Results go to $OUT (or bench/results) as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DAY=$(date +%Y-%m-%d)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# GPU utilisation every 200 ms beside each run (the mean is printed after it)
util() { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$1" & echo $!; }
mean_util() { awk -F', ' '{s+=$1; n++} END {if (n) printf "gpu utilisation mean %.1f%% over %d samples\n", s/n, n}' "$1"; }

for spec in "ViT-B-32 1024 2" "ViT-L-14 256 1"; do
  set -- $spec
  pid=$(util "$OUT/$1-smi.csv")
  timeout 200 python3 bench/throughput.py --model "$1" --device cuda --batch-size "$2" --shards 4 \
    --samples-per-shard 1000 --max-side 512 --copies 4 --rounds "$3" --skip-naive --out "$OUT/$DAY-h200-$1.json" || echo "$1 run failed: $?"
  kill "$pid" || true
  mean_util "$OUT/$1-smi.csv"
done

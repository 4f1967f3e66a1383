#!/usr/bin/env bash
# Download, here, the wheels bench/gpu.sh needs on a GPU machine that has no network
# (torch, torchvision, pillow, numpy, pyarrow, click and rich are already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl open_clip_torch ftfy wcwidth celery kombu billiard vine amqp click-didyoumean \
  click-repl click-plugins prompt_toolkit tzdata redis boto3 botocore s3transfer jmespath braceexpand
du -sh .whl

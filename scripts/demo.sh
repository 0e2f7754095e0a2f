#!/usr/bin/env bash
# The main job on embedded defaults, no server needed: set up, then self-check the
# connector layer on a local directory (put, get, ranges, tensor blobs, list, delete).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvswap check "${1:-file:///tmp/kvswap}"

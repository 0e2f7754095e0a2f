#!/usr/bin/env bash
# The main job on embedded defaults, no server needed: set up, then run `kvswap demo` (a
# multi-session chat whose KV is swapped between a small pool, host memory and a local
# directory, with SQLite meta; every turn checked against recomputing). Arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvswap demo "$@"

#!/usr/bin/env bash
# The test command: install what is missing, start every server on free loopback ports,
# run pytest, and stop the servers by PID (also when something fails).
set -euo pipefail
cd "$(dirname "$0")/.."
# About 6 GB are written: two virtual environments (4 GB), the servers' data, the tests' files.
echo "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free here, $(df -h --output=avail /tmp | tail -1 | tr -d ' ') in /tmp"
bash scripts/setup.sh --test --vllm
export KVSWAP_TEST_VLLM=1  # the vLLM tests must run here (they skip only where .venv-vllm was never made)
echo "lint: ruff check, mypy"
.venv/bin/ruff check kvswap tests bench
.venv/bin/mypy
state=$(mktemp -d /tmp/kvswap-servers.XXXXXX)
chmod 755 "$state"
cleanup() { .venv/bin/python -m kvswap.testing.servers down --dir "$state" || true; rm -rf "$state"; }
trap cleanup EXIT
.venv/bin/python -m kvswap.testing.servers up --dir "$state" > "$state/env.sh"
# shellcheck disable=SC1091
source "$state/env.sh"
echo "servers: $(grep -o 'KVSWAP_TEST_[A-Z0-9_]*' "$state/env.sh" | tr '\n' ' ')"
.venv/bin/python -m pytest -p no:cacheprovider -q -ra "$@"

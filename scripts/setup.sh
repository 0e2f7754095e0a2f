#!/usr/bin/env bash
# Set up kvswap in ./.venv (idempotent). With --test, also the test tools and the
# Debian servers the tests start (redis-server, PostgreSQL, MariaDB, etcd, FUSE for JuiceFS).
# torch==2.13.0 is installed first, exactly so: on these machines that takes the CPU
# wheel on disk, where any other torch spec would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="all"
[[ "${1:-}" == "--test" ]] && extras="all,test"

if [[ "$extras" == *test* ]]; then
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-benchmark >/dev/null || missing+=(redis-tools)
  command -v fusermount3 >/dev/null || missing+=(fuse3)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
  command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || missing+=(mariadb-server)
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  if ((${#missing[@]})); then
    echo "setup: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No service may start at install time (nginx would take port 80): the tests start their own.
    policy=""
    [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1; }
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ -n "$policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0" numpy
"${pip[@]}" -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import kvswap, torch; print('setup: kvswap', kvswap.__version__, 'torch', torch.__version__)"

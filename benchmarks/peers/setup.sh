#!/usr/bin/env bash
# Throwaway venv with the store peers that benchmarks/store_bench.py compares kvmesh against
# (issue 24). The main venv never gets these: store_bench.py runs the peer drivers in this
# venv as subprocesses and reads their JSON.
#
#   sudo-less root:  bash benchmarks/peers/setup.sh [VENV] [--with-lmcache]
#   then:            python -P benchmarks/store_bench.py --peers-venv VENV
#
# VENV defaults to /tmp/kvmesh-peers. Installs
#   - apt: libibverbs1 librdmacm1 libnuma1 (mooncake-transfer-engine-non-cuda links them even
#     when only TCP is used), redis-server if missing (the Redis peer runs a real server);
#   - pip: mooncake-transfer-engine-non-cuda (Mooncake Store + mooncake_master), nixl (UCX
#     backend; the plain `nixl` wheel pulls nixl-cu12/nixl-cu13 and runs CPU-only), redis +
#     hiredis, psutil, numpy;
#   - with --with-lmcache: lmcache and its numba, sortedcontainers, py-cpuinfo, cachetools,
#     given at most LMCACHE_TIMEOUT_S (default 300) seconds; a failure or timeout is reported
#     and does not fail the script (store_bench.py has no LMCache driver yet either).
# Re-running is cheap: pip skips what is installed. Remove the folder to undo.
set -euo pipefail

VENV=/tmp/kvmesh-peers
WITH_LMCACHE=0
for arg in "$@"; do
    case "$arg" in
        --with-lmcache) WITH_LMCACHE=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) VENV="$arg" ;;
    esac
done
PYTHON=${PYTHON:-python3}

missing=()
for lib in libibverbs.so.1 librdmacm.so.1 libnuma.so.1; do
    ldconfig -p | grep -q "$lib" || missing+=("$lib")
done
if ((${#missing[@]})) || ! command -v redis-server >/dev/null; then
    echo "apt: installing libibverbs1 librdmacm1 libnuma1 redis-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 librdmacm1 libnuma1 \
        redis-server >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" numpy psutil redis hiredis
"${PIP[@]}" mooncake-transfer-engine-non-cuda
"${PIP[@]}" nixl

if ((WITH_LMCACHE)); then
    if timeout "${LMCACHE_TIMEOUT_S:-300}" "${PIP[@]}" numba sortedcontainers py-cpuinfo \
        cachetools lmcache; then
        echo "lmcache: installed"
    else
        echo "lmcache: NOT installed (failed or timed out after ${LMCACHE_TIMEOUT_S:-300} s)"
    fi
fi

"$VENV/bin/python" - <<'PY'
import importlib
for name in ("numpy", "psutil", "redis", "hiredis", "mooncake.store", "nixl._api", "lmcache"):
    try:
        importlib.import_module(name)
        print(f"  {name}: ok")
    except Exception as exc:  # report, never fail: every peer is optional to store_bench.py
        print(f"  {name}: missing ({type(exc).__name__}: {exc})")
PY
ls "$VENV/bin/mooncake_master" >/dev/null && echo "  mooncake_master: ok"
echo "peers venv ready: $VENV"

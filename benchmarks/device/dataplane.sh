# Issue 24 on a lent GPU: the store's NIXL data plane against NIXL raw, host and GPU memory
# (benchmarks/dataplane_device_bench.py), then the gpu test of pages into GPU tensors. Output in
# $OUT/dp. Carry .nixl (make device-nixl) in one call (`ls .nixl` will do), then .whl (make
# device-wheels) in the next while the machine is warm: together they pass 64 MiB.
set -x
. benchmarks/device/setup.sh
SITE=/tmp/site
if [ ! -f $SITE/.nixl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .nixl/*.whl && touch $SITE/.nixl
fi
python3 -P -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
# nixl-cu13's UCX CUDA module needs libcudart.so.13: torch's if it has one, else the carried wheel's
CUDART=$(python3 -P - <<'PY'
import glob, os, site, sys
roots = sys.path + site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]
hits = [p for r in roots if r and os.path.isdir(r) for p in glob.glob(os.path.join(r, "**", "libcudart.so.13*"), recursive=True)]
print(os.path.dirname(hits[0]) if hits else "")
PY
)
if [ -z "$CUDART" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/cudart13 .nixl/cudart/*.whl
  CUDART=/tmp/cudart13/nvidia/cu13/lib
fi
export LD_LIBRARY_PATH=$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "libcudart.so.13 from $CUDART"
python3 -P -c "
import torch
from kvmesh.cachestore.dataplane.agent import make_agent, nixl_api
print('nixl', nixl_api())
a = make_agent('probe', progress_thread=False)
t = torch.ones(1 << 20, dtype=torch.uint8, device='cuda')
try:
    a.register_memory([(t.data_ptr(), t.numel(), t.device.index or 0, '')], 'VRAM'); print('VRAM registration: ok')
except Exception as e:
    print('VRAM registration failed:', e)
import os; os._exit(0)"
mkdir -p $OUT/dp
timeout 230 python3 benchmarks/dataplane_device_bench.py --repeats 9 --max-seconds 120 --out $OUT/dp 2>&1 | tail -60
UCX_TLS=tcp,cuda_copy UCX_NET_DEVICES=lo timeout 90 python3 -P -m pytest -q -c pyproject.toml --rootdir . -p no:cacheprovider -m gpu tests/cachestore/test_dataplane_tensors.py 2>&1 | tail -15

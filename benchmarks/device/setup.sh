# Sourced first by the other scripts here, on a lent GPU machine with no package index, from the
# repository root with `.whl/` (`make device-wheels`) carried over: installs the wheels into
# /tmp/site once per machine and defines `model_folder SHAPE DIR` (benchmarks/model_folders.py,
# SmolLM2's tokenizer from .whl/tok).
if [ ! -f /tmp/site/.kvmesh-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.kvmesh-wheels
else  # a warm machine: the carried kvmesh wheel may be newer than the installed one
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .whl/kvmesh-*.whl
fi
export PYTHONPATH=/tmp/site
model_folder() {
  [ -f "$2/config.json" ] || (cd benchmarks && python3 -c "import sys; from pathlib import Path
from model_folders import make_folder
make_folder(sys.argv[1], Path(sys.argv[2]), Path('../.whl/tok'))" "$@")
}
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv

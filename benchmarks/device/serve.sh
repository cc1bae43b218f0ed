# Issue 19 on a lent GPU: the serving path three ways (benchmarks/serve_bench.py) for the
# Llama-3.2-1B-shaped folder, then the runs that separate the worker's costs. Output in $OUT.
# Carry .whl (make device-wheels). About 10 minutes on an H100: pass timeout_s 600.
set -x
. benchmarks/device/setup.sh
model_folder llama-1b /tmp/llama-1b
SB="python3 benchmarks/serve_bench.py --model /tmp/llama-1b --device cuda --num-prompts 512 \
  --prompt-len 500 --output-len 256 --client-procs 8"
$SB --concurrency 64 256 --out $OUT/serve > $OUT/serve.log 2>&1; tail -12 $OUT/serve.log
# the worker without the store's write-through (as the in-process engine runs), at 64
timeout 90 $SB --concurrency 64 --ways grpc --grpc-without-store --out $OUT/nostore \
  > $OUT/nostore.log 2>&1; tail -3 $OUT/nostore.log
# decode windows of 16 steps: half the gRPC messages per token
timeout 150 $SB --concurrency 64 --ways engine grpc --decode-steps 16 --out $OUT/d16 \
  > $OUT/d16.log 2>&1; tail -6 $OUT/d16.log
# the worker's opt-in grpc.aio server (streams as coroutines on one loop), grpc and http ways
timeout 150 $SB --concurrency 64 256 --ways grpc http --grpc-server aio --out $OUT/aio \
  > $OUT/aio.log 2>&1; tail -6 $OUT/aio.log
# the same overhead without the model: worker_profile's synthetic host-bound engine, both servers
timeout 120 python3 benchmarks/worker_profile.py --servers sync aio > $OUT/worker_profile.log 2>&1
tail -8 $OUT/worker_profile.log

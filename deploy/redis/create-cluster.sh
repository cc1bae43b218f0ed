#!/usr/bin/env bash
# Start a 3-master Redis Cluster on one host from redis-cluster.conf, for trials and tests.
#   deploy/redis/create-cluster.sh [BASE_PORT=7000] [DIR=/tmp/kvmesh-redis-cluster] [MAXMEMORY=1gb]
# Nodes listen on BASE_PORT, BASE_PORT+1, BASE_PORT+2 with data and logs in DIR/<port>/.
# Stop them with: redis-cli -p PORT shutdown nosave (each port).
# On three hosts, run redis-server with redis-cluster.conf on each and then only the
# `redis-cli --cluster create HOST1:7000 HOST2:7000 HOST3:7000 --cluster-replicas 0` line.
set -euo pipefail
base_port=${1:-7000}
dir=${2:-/tmp/kvmesh-redis-cluster}
maxmemory=${3:-1gb}
template="$(cd "$(dirname "$0")" && pwd)/redis-cluster.conf"
nodes=()
for port in "$base_port" $((base_port + 1)) $((base_port + 2)); do
  mkdir -p "$dir/$port"
  sed -e "s/^port 7000$/port $port/" \
      -e "s/^cluster-config-file nodes-7000.conf$/cluster-config-file nodes-$port.conf/" \
      -e "s/^bind 0.0.0.0$/bind 127.0.0.1/" \
      -e "s/^maxmemory .*/maxmemory $maxmemory/" \
      -e "s/^io-threads .*/io-threads 1/" \
      "$template" > "$dir/$port/redis.conf"
  redis-server "$dir/$port/redis.conf" --dir "$dir/$port" --daemonize yes \
    --logfile "$dir/$port/redis.log" --pidfile "$dir/$port/redis.pid"
  nodes+=("127.0.0.1:$port")
done
for port in "$base_port" $((base_port + 1)) $((base_port + 2)); do
  for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
is_ok() {  # every node must agree, not only the first
  for port in "$base_port" $((base_port + 1)) $((base_port + 2)); do
    redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' || return 1
  done
}
for _ in $(seq 100); do
  if is_ok; then
    echo "redis cluster ready: redis+cluster://127.0.0.1:$base_port"
    exit 0
  fi
  sleep 0.1
done
echo "redis cluster did not reach cluster_state:ok" >&2
exit 1

#!/usr/bin/env bash
# A local Redis Cluster for the tests and the bench: 3 masters on 127.0.0.1:7000-7002 (no replicas,
# no persistence), their files under $REDIS_CLUSTER_DIR (default /tmp/order-timeouts-redis-cluster).
#
#   scripts/redis_cluster.sh         start it, or check that it is up (idempotent); a node that was
#                                    killed starts again and rejoins (as a replica, if its replica
#                                    took over meanwhile)
#   scripts/redis_cluster.sh stop    shut its servers down and remove their files
#
# REDIS_CLUSTER_PORTS="7000 7001 7002" picks other ports (at least 3: Redis Cluster's minimum of masters).
# REDIS_CLUSTER_REPLICAS=1 gives each master that many replicas, for failover: the ports then count
# masters × (1 + replicas), e.g. the HA tests' cluster
#   REDIS_CLUSTER_PORTS="7010 7011 7012 7013 7014 7015" REDIS_CLUSTER_REPLICAS=1 \
#   REDIS_CLUSTER_DIR=/tmp/order-timeouts-redis-cluster-ha scripts/redis_cluster.sh
# A replica takes over from a master that does not answer for the node timeout (2 s).
set -euo pipefail

read -r -a ports <<<"${REDIS_CLUSTER_PORTS:-7000 7001 7002}"
replicas=${REDIS_CLUSTER_REPLICAS:-0}
dir=${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/order-timeouts-redis-cluster}
log() { echo "redis_cluster: $*"; }
cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }
up() { [ "$(cli "$1" ping 2>/dev/null)" = PONG ]; }
state_ok() { cli "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }
# a master, or a replica whose link to its master is up (its first full sync done)
synced() {
  local replication
  replication=$(cli "$1" info replication 2>/dev/null | tr -d '\r')
  grep -q '^role:master' <<<"$replication" || grep -q '^master_link_status:up' <<<"$replication"
}

if [ "${1:-start}" = stop ]; then
  for port in "${ports[@]}"; do
    if up "$port"; then cli "$port" shutdown nosave >/dev/null 2>&1 || true; fi
  done
  rm -rf "$dir"
  log "stopped"
  exit 0
fi

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || { log "$tool is not installed (apt-get install redis-server redis-tools)"; exit 1; }
done

for port in "${ports[@]}"; do
  up "$port" && continue
  mkdir -p "$dir/$port"
  # nodes.conf stays in $dir: a restarted node rejoins its cluster (empty, as nothing is persisted).
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$dir/$port" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --save "" --appendonly no --repl-diskless-sync-delay 0 --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log" >/dev/null
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 50); do up "$port" && break; sleep 0.1; done
  up "$port" || { log "redis-server on port $port did not start (see $dir/$port/redis.log)"; exit 1; }
done

if ! state_ok "${ports[0]}"; then
  known=$(cli "${ports[0]}" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')
  if [ "$known" = 1 ]; then
    addresses=()
    for port in "${ports[@]}"; do addresses+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${addresses[@]}" --cluster-replicas "$replicas" --cluster-yes >/dev/null
  fi
fi
for port in "${ports[@]}"; do
  for _ in $(seq 1 100); do state_ok "$port" && break; sleep 0.1; done
  state_ok "$port" || { log "cluster not ok on port $port; 'scripts/redis_cluster.sh stop' and try again"; exit 1; }
done
# A replica takes over only once it holds its master's data: ready means every replica has synced.
for port in "${ports[@]}"; do
  for _ in $(seq 1 300); do synced "$port" && break; sleep 0.1; done
  synced "$port" || { log "the replica on port $port has not synced with its master (see $dir/$port/redis.log)"; exit 1; }
done
log "Redis Cluster ready on 127.0.0.1 ports ${ports[*]}"

#!/usr/bin/env bash
# A local Redis under Sentinel for the tests and for trying failovers: a primary on 127.0.0.1:6390,
# one replica on 6391 and 3 sentinels on 26390-26392 monitoring the service `order-timeouts`, with
# short timeouts (a killed primary is replaced within a few seconds). No persistence; the files live
# under $REDIS_SENTINEL_DIR (default /tmp/order-timeouts-redis-sentinel).
#
#   scripts/redis_sentinel.sh [start]   start it, or check that it is up (idempotent)
#   scripts/redis_sentinel.sh status    which server is the primary, and who answers
#   scripts/redis_sentinel.sh kill      SIGKILL the current primary (the sentinels then promote the replica)
#   scripts/redis_sentinel.sh stop      shut everything down and remove the files
#
#   REDIS_SENTINEL_PORTS="6390 6391"              the primary's and the replica's ports
#   REDIS_SENTINEL_SENTINEL_PORTS="26390 26391 26392"
#   REDIS_SENTINEL_SERVICE=order-timeouts         the monitored service's name
#   REDIS_SENTINEL_DOWN_AFTER_MS=1000             how long a primary may not answer before it is down
#   REDIS_SENTINEL_FAILOVER_TIMEOUT_MS=3000       sentinel's failover-timeout
#
# The clients' URL: redis+sentinel://127.0.0.1:26390,127.0.0.1:26391,127.0.0.1:26392/order-timeouts
# A server started again after a kill (`start`) comes back as a replica of whoever is the primary.
set -euo pipefail

read -r -a servers <<<"${REDIS_SENTINEL_PORTS:-6390 6391}"
read -r -a sentinels <<<"${REDIS_SENTINEL_SENTINEL_PORTS:-26390 26391 26392}"
service=${REDIS_SENTINEL_SERVICE:-order-timeouts}
down_after=${REDIS_SENTINEL_DOWN_AFTER_MS:-1000}
failover_timeout=${REDIS_SENTINEL_FAILOVER_TIMEOUT_MS:-3000}
dir=${REDIS_SENTINEL_DIR:-${TMPDIR:-/tmp}/order-timeouts-redis-sentinel}
quorum=$(((${#sentinels[@]} / 2) + 1))
log() { echo "redis_sentinel: $*"; }
cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }
up() { [ "$(cli "$1" ping 2>/dev/null)" = PONG ]; }
role() { cli "$1" role 2>/dev/null | head -n 1; }
# The primary as the sentinels see it (port only), empty when none answers.
primary() {
  local port
  for port in "${sentinels[@]}"; do
    if up "$port"; then
      cli "$port" sentinel get-master-addr-by-name "$service" 2>/dev/null | sed -n 2p
      return
    fi
  done
}

case "${1:-start}" in
  stop)
    for port in "${sentinels[@]}" "${servers[@]}"; do
      if up "$port"; then cli "$port" shutdown nosave >/dev/null 2>&1 || true; fi
    done
    rm -rf "$dir"
    log "stopped"
    exit 0
    ;;
  status)
    current=$(primary)
    for port in "${servers[@]}"; do
      if up "$port"; then log "redis $port: $(role "$port")"; else log "redis $port: down"; fi
    done
    for port in "${sentinels[@]}"; do
      if up "$port"; then log "sentinel $port: up"; else log "sentinel $port: down"; fi
    done
    log "primary of $service: ${current:-unknown}"
    [ -n "$current" ] && up "$current"
    exit
    ;;
  kill)
    current=$(primary)
    [ -n "$current" ] && [ -f "$dir/$current/redis.pid" ] || { log "no primary to kill"; exit 1; }
    kill -9 "$(cat "$dir/$current/redis.pid")"
    log "primary on port $current killed"
    exit 0
    ;;
  start) ;;
  *)
    echo "usage: $0 [start|status|kill|stop]" >&2
    exit 2
    ;;
esac

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || { log "$tool is not installed (apt-get install redis-server redis-tools)"; exit 1; }
done
# Debian ships redis-sentinel as its own package; the same program runs as `redis-server --sentinel`.
if command -v redis-sentinel >/dev/null; then
  sentinel_cmd=(redis-sentinel)
else
  sentinel_cmd=(redis-server)
  sentinel_flag=--sentinel
fi

wait_up() { # port, what
  for _ in $(seq 1 50); do up "$1" && return 0; sleep 0.1; done
  log "$2 on port $1 did not start (see $dir/$1/*.log)"
  exit 1
}

# The primary is the first server on a fresh start; afterwards whoever the sentinels say.
current=$(primary)
[ -n "$current" ] || current=${servers[0]}
for port in "${servers[@]}"; do
  up "$port" && continue
  mkdir -p "$dir/$port"
  replica_of=()
  # A server that is not the primary starts as a replica (of the live primary, when it answers).
  if [ "$port" != "$current" ]; then replica_of=(--replicaof 127.0.0.1 "$current"); fi
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$dir/$port" \
    --save "" --appendonly no --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log" \
    --replica-serve-stale-data yes "${replica_of[@]}" >/dev/null
  wait_up "$port" redis-server
done

for port in "${sentinels[@]}"; do
  up "$port" && continue
  mkdir -p "$dir/$port"
  conf="$dir/$port/sentinel.conf"
  # Sentinel rewrites its file as it learns the others; a fresh file after a stop.
  if [ ! -f "$conf" ]; then
    cat >"$conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
dir $dir/$port
pidfile $dir/$port/sentinel.pid
logfile $dir/$port/sentinel.log
sentinel monitor $service 127.0.0.1 $current $quorum
sentinel down-after-milliseconds $service $down_after
sentinel failover-timeout $service $failover_timeout
sentinel parallel-syncs $service 1
EOF
  fi
  "${sentinel_cmd[@]}" "$conf" ${sentinel_flag:+"$sentinel_flag"} >/dev/null
  wait_up "$port" sentinel
done

# Ready when every sentinel agrees on a live primary, knows the other sentinels and every replica,
# and every replica is in sync: then a failover can start at once.
ready() {
  local port agreed=""
  for port in "${sentinels[@]}"; do
    local info
    info=$(cli "$port" sentinel master "$service" 2>/dev/null | paste - - ) || return 1
    grep -q "^num-other-sentinels	$((${#sentinels[@]} - 1))$" <<<"$info" || return 1
    grep -q "^num-slaves	$((${#servers[@]} - 1))$" <<<"$info" || return 1
    cli "$port" sentinel replicas "$service" 2>/dev/null | grep -q 's_down' && return 1
    local addr
    addr=$(cli "$port" sentinel get-master-addr-by-name "$service" 2>/dev/null | sed -n 2p)
    [ -n "$addr" ] || return 1
    [ -z "$agreed" ] || [ "$agreed" = "$addr" ] || return 1
    agreed=$addr
  done
  [ "$(role "$agreed")" = master ] || return 1
  for port in "${servers[@]}"; do
    [ "$port" = "$agreed" ] && continue
    cli "$port" info replication 2>/dev/null | grep -q '^master_link_status:up' || return 1
  done
}
for _ in $(seq 1 300); do ready && break; sleep 0.1; done
ready || { log "the sentinels do not agree on a primary yet; 'scripts/redis_sentinel.sh status'"; exit 1; }
log "Redis primary on 127.0.0.1:$(primary), replica(s) and sentinels on ${sentinels[*]} (service $service)"

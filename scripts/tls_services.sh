#!/usr/bin/env bash
# A Redis and a RabbitMQ node that speak TLS only and require client certificates, for the TLS tests
# and for trying `rediss://` and `amqps://` by hand. Loopback only, ports of their own; the shared
# Redis on 6379 and RabbitMQ node rabbit@localhost are never touched.
#
#   scripts/tls_services.sh start CERTS   start both with CERTS/ca.pem, CERTS/server.pem and
#                                         CERTS/server.key (the tests make them); wait until they answer
#   scripts/tls_services.sh stop          stop both and remove their files
#
# Redis: TLS on 127.0.0.1:6480 (TLS_REDIS_PORT), no plain port, no persistence; a sentinel over TLS on
# 127.0.0.1:26480 (TLS_SENTINEL_PORT) names it as the primary of the service `order-timeouts-tls`
# (rediss+sentinel://127.0.0.1:26480/order-timeouts-tls).
# RabbitMQ: node ot-tls@localhost, amqps on 127.0.0.1:5691 (TLS_RABBITMQ_PORT), no plain listener,
# distribution port 25692, its own Erlang cookie; user guest/guest. Files under $TLS_SERVICES_DIR
# (default /tmp/order-timeouts-tls). Run as root, the node runs as the `rabbitmq` user.
set -euo pipefail

redis_port=${TLS_REDIS_PORT:-6480}
sentinel_port=${TLS_SENTINEL_PORT:-26480}
amqps_port=${TLS_RABBITMQ_PORT:-5691}
dist_port=${TLS_RABBITMQ_DIST_PORT:-25692}
node=ot-tls@localhost
dir=${TLS_SERVICES_DIR:-${TMPDIR:-/tmp}/order-timeouts-tls}
log() { echo "tls_services: $*" >&2; }

if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  bin=/usr/lib/rabbitmq/bin
elif command -v rabbitmq-server >/dev/null; then
  bin=$(dirname "$(command -v rabbitmq-server)")
else
  bin=
fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
rabbit_pid() { cat "$dir/rabbitmq/beam.pid" 2>/dev/null || cat "$dir/rabbitmq/pid" 2>/dev/null || true; }
ctl() {
  (cd "$dir" && HOME="$dir/home" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq/rabbitmq-env.conf" \
    "$bin/rabbitmqctl" -n "$node" --erlang-cookie "$(cat "$dir/cookie")" "$@")
}

start_redis() {
  local certs=$1
  alive "$(cat "$dir/redis/pid" 2>/dev/null || true)" && return 0
  mkdir -p "$dir/redis"
  redis-server --bind 127.0.0.1 --port 0 --tls-port "$redis_port" \
    --tls-cert-file "$certs/server.pem" --tls-key-file "$certs/server.key" --tls-ca-cert-file "$certs/ca.pem" \
    --tls-auth-clients yes --save "" --appendonly no --dir "$dir/redis" \
    --daemonize yes --pidfile "$dir/redis/pid" --logfile "$dir/redis/log"
  for _ in $(seq 1 100); do listening "$redis_port" && return 0; sleep 0.05; done
  log "redis-server did not listen on $redis_port; see $dir/redis/log"
  exit 1
}

start_sentinel() {
  local certs=$1
  alive "$(cat "$dir/sentinel/pid" 2>/dev/null || true)" && return 0
  mkdir -p "$dir/sentinel"
  # A sentinel rewrites its configuration file: it gets one of its own. It connects to the server
  # with the client certificate (the server requires one).
  cat >"$dir/sentinel/sentinel.conf" <<CONF
bind 127.0.0.1
port 0
tls-port $sentinel_port
tls-cert-file $certs/server.pem
tls-key-file $certs/server.key
tls-client-cert-file $certs/client.pem
tls-client-key-file $certs/client.key
tls-ca-cert-file $certs/ca.pem
tls-auth-clients yes
tls-replication yes
daemonize yes
pidfile $dir/sentinel/pid
logfile $dir/sentinel/log
dir $dir/sentinel
sentinel monitor order-timeouts-tls 127.0.0.1 $redis_port 1
CONF
  redis-server "$dir/sentinel/sentinel.conf" --sentinel
  for _ in $(seq 1 100); do listening "$sentinel_port" && return 0; sleep 0.05; done
  log "sentinel did not listen on $sentinel_port; see $dir/sentinel/log"
  exit 1
}

start_rabbitmq() {
  local certs=$1 home="$dir/rabbitmq" user=()
  alive "$(rabbit_pid)" && return 0
  mkdir -p "$home/mnesia" "$home/log" "$home/certs" "$dir/home"
  cp "$certs/ca.pem" "$certs/server.pem" "$certs/server.key" "$home/certs/"
  [ -s "$dir/cookie" ] || python3 -c 'import secrets; print(secrets.token_hex(20).upper(), end="")' >"$dir/cookie"
  chmod 400 "$dir/cookie"
  cat >"$home/rabbitmq-env.conf" <<EOF
NODENAME=$node
NODE_IP_ADDRESS=127.0.0.1
DIST_PORT=$dist_port
MNESIA_BASE=$home/mnesia
LOG_BASE=$home/log
CONFIG_FILE=$home/rabbitmq.conf
ENABLED_PLUGINS_FILE=$home/enabled_plugins
PID_FILE=$home/beam.pid
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-setcookie $(cat "$dir/cookie") -kernel inet_dist_use_interface {127,0,0,1}"
EOF
  echo '[].' >"$home/enabled_plugins"
  cat >"$home/rabbitmq.conf" <<EOF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$amqps_port
ssl_options.cacertfile = $home/certs/ca.pem
ssl_options.certfile = $home/certs/server.pem
ssl_options.keyfile = $home/certs/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
loopback_users = none
log.file.level = warning
EOF
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$home"
    user=(runuser -u rabbitmq --)
  fi
  setsid "${user[@]}" env HOME="$dir/home" RABBITMQ_CONF_ENV_FILE="$home/rabbitmq-env.conf" \
    "$bin/rabbitmq-server" >"$home/log/console.log" 2>&1 </dev/null &
  echo $! >"$home/pid"
  for _ in $(seq 1 1200); do
    listening "$amqps_port" && ctl -q await_startup --timeout 60 >/dev/null 2>&1 && return 0
    alive "$(cat "$home/pid")" || { log "node $node exited; see $home/log"; exit 1; }
    sleep 0.1
  done
  log "node $node not listening on $amqps_port after 120 s; see $home/log"
  exit 1
}

case ${1:-} in
start)
  certs=$(cd "${2:?start CERTS: a folder with ca.pem, server.pem and server.key}" && pwd)
  command -v redis-server >/dev/null || { log "redis-server is not installed"; exit 1; }
  [ -n "$bin" ] || { log "rabbitmq-server is not installed"; exit 1; }
  mkdir -p "$dir"
  start_redis "$certs"
  start_sentinel "$certs"
  start_rabbitmq "$certs"
  log "ready: rediss://127.0.0.1:$redis_port, rediss+sentinel://127.0.0.1:$sentinel_port/order-timeouts-tls, amqps://127.0.0.1:$amqps_port"
  ;;
stop)
  for pid in "$(cat "$dir/redis/pid" 2>/dev/null || true)" "$(cat "$dir/sentinel/pid" 2>/dev/null || true)"; do
    if alive "$pid"; then kill "$pid"; fi
  done
  if [ -n "$bin" ] && [ -s "$dir/cookie" ] && alive "$(rabbit_pid)"; then
    ctl -q shutdown --timeout 30 >/dev/null 2>&1 || kill -KILL "$(rabbit_pid)" 2>/dev/null || true
  fi
  launcher=$(cat "$dir/rabbitmq/pid" 2>/dev/null || true)
  if alive "$launcher"; then kill "$launcher" 2>/dev/null || true; fi
  rm -rf "$dir"
  log "stopped"
  ;;
*)
  log "usage: $0 start CERTS | stop"
  exit 2
  ;;
esac

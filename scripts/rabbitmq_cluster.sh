#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster for the tests and for trying failover: nodes rabbit-ha1@localhost,
# rabbit-ha2@localhost and rabbit-ha3@localhost with AMQP on 127.0.0.1:5681-5683, no plugins, their
# own Erlang cookie, files under $RABBITMQ_CLUSTER_DIR (default /tmp/order-timeouts-rabbitmq-cluster).
# It never touches another node on this machine (rabbit@localhost keeps running as it is).
#
#   scripts/rabbitmq_cluster.sh [start]   start the nodes that are not running and wait until all three
#                                         are clustered (idempotent; a node that was killed rejoins)
#   scripts/rabbitmq_cluster.sh status    one line per node; exit 1 unless all three run clustered
#   scripts/rabbitmq_cluster.sh url       the multi-host AMQP URL of the cluster (vhost /)
#   scripts/rabbitmq_cluster.sh kill N    SIGKILL node N (1-3): a crash, as the failover tests need
#   scripts/rabbitmq_cluster.sh freeze N  SIGSTOP node N: it answers nothing, its sockets stay open
#   scripts/rabbitmq_cluster.sh thaw N    SIGCONT node N
#   scripts/rabbitmq_cluster.sh ctl N ARGS...   rabbitmqctl ARGS against node N
#   scripts/rabbitmq_cluster.sh stop      stop every node and remove their files
#
# RABBITMQ_CLUSTER_PORTS="5681 5682 5683" and RABBITMQ_CLUSTER_DIST_PORTS="25681 25682 25683" pick
# other ports; RABBITMQ_CLUSTER_NODES="rabbit-ha1 rabbit-ha2 rabbit-ha3" other node names.
# Run as root, the nodes run as the `rabbitmq` user (Debian's packaging), otherwise as the caller.
set -euo pipefail

read -r -a ports <<<"${RABBITMQ_CLUSTER_PORTS:-5681 5682 5683}"
read -r -a dist_ports <<<"${RABBITMQ_CLUSTER_DIST_PORTS:-25681 25682 25683}"
read -r -a names <<<"${RABBITMQ_CLUSTER_NODES:-rabbit-ha1 rabbit-ha2 rabbit-ha3}"
dir=${RABBITMQ_CLUSTER_DIR:-${TMPDIR:-/tmp}/order-timeouts-rabbitmq-cluster}
log() { echo "rabbitmq_cluster: $*" >&2; }

if [ "${#ports[@]}" -ne 3 ] || [ "${#dist_ports[@]}" -ne 3 ] || [ "${#names[@]}" -ne 3 ]; then
  log "RABBITMQ_CLUSTER_PORTS, RABBITMQ_CLUSTER_DIST_PORTS and RABBITMQ_CLUSTER_NODES take three values each"
  exit 2
fi

# Debian and Ubuntu keep the real scripts in /usr/lib/rabbitmq/bin (/usr/sbin has wrappers that
# switch to the default node's user and home); other installs put them on the PATH.
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  bin=/usr/lib/rabbitmq/bin
elif command -v rabbitmq-server >/dev/null; then
  bin=$(dirname "$(command -v rabbitmq-server)")
else
  bin=
fi

node() { echo "${names[$1]}@localhost"; }
cookie() { cat "$dir/cookie"; }
ctl() {
  local i=$1
  shift
  # From $dir: a CLI that fails leaves its erl_crash.dump there, not in the caller's directory.
  (cd "$dir" && HOME="$dir/home" RABBITMQ_CONF_ENV_FILE="$dir/${names[$i]}/rabbitmq-env.conf" \
    "$bin/rabbitmqctl" -n "$(node "$i")" --erlang-cookie "$(cookie)" "$@")
}
# The launcher (runuser, then the rabbitmq-server script) and the Erlang VM it starts, which
# writes its own pid file once it runs.
launcher_pid() { cat "$dir/${names[$1]}/pid" 2>/dev/null || true; }
beam_pid() { cat "$dir/${names[$1]}/beam.pid" 2>/dev/null || true; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
running() { alive "$(beam_pid "$1")" || alive "$(launcher_pid "$1")"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/${ports[$1]}") 2>/dev/null; }
booted() { running "$1" && listening "$1"; }
members() { ctl "$1" -q cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
print(" ".join(sorted(json.load(sys.stdin).get("running_nodes", []))))'; }
all_nodes() { local i; for i in 0 1 2; do node "$i"; done | sort | tr '\n' ' ' | sed 's/ $//'; }

start_node() {
  local i=$1 name=${names[$1]} user
  local home="$dir/$name"
  mkdir -p "$home/mnesia" "$home/log"
  # The node's whole environment, so that the system's rabbitmq-env.conf (which names the default
  # node) is never read: loopback only, its own ports, no plugins.
  cat >"$home/rabbitmq-env.conf" <<EOF
NODENAME=$(node "$i")
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=${ports[$i]}
DIST_PORT=${dist_ports[$i]}
MNESIA_BASE=$home/mnesia
LOG_BASE=$home/log
CONFIG_FILE=$home/rabbitmq.conf
ADVANCED_CONFIG_FILE=$home/advanced.config
ENABLED_PLUGINS_FILE=$home/enabled_plugins
PID_FILE=$home/beam.pid
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-setcookie $(cookie) -kernel inet_dist_use_interface {127,0,0,1}"
EOF
  echo '[].' >"$home/enabled_plugins"
  # A quorum queue dead-letters at least once: a message whose target queue does not confirm (its
  # leader was on a node that died) is sent again after this timeout, 3 minutes by default. Timers
  # in the delay cascade at a node's loss would wait that long (docs/operations.md recommends this).
  echo '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].' >"$home/advanced.config"
  {
    echo "listeners.tcp.local = 127.0.0.1:${ports[$i]}"
    echo "loopback_users = none"
    echo "cluster_formation.peer_discovery_backend = classic_config"
    local j
    for j in 0 1 2; do echo "cluster_formation.classic_config.nodes.$((j + 1)) = $(node "$j")"; done
    # A killed node's peers notice at once (its sockets close); this bounds a silent partition.
    echo "cluster_partition_handling = pause_minority"
    echo "log.file.level = warning"
  } >"$home/rabbitmq.conf"
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$home"
    user=(runuser -u rabbitmq --)
  else
    user=()
  fi
  # setsid: the node outlives this script and its caller's terminal or test process group.
  setsid "${user[@]}" env HOME="$dir/home" RABBITMQ_CONF_ENV_FILE="$home/rabbitmq-env.conf" \
    "$bin/rabbitmq-server" >"$home/log/console.log" 2>&1 </dev/null &
  echo $! >"$home/pid"
}

wait_clustered() {
  local expected i
  expected=$(all_nodes)
  for i in 0 1 2; do
    for _ in $(seq 1 600); do
      booted "$i" && [ "$(members "$i")" = "$expected" ] && break
      running "$i" || { log "node $(node "$i") exited; see $dir/${names[$i]}/log"; exit 1; }
      sleep 0.1
    done
    [ "$(members "$i")" = "$expected" ] || { log "node $(node "$i") not clustered after 60 s; see $dir/${names[$i]}/log"; exit 1; }
  done
}

command=${1:-start}
if [ "$command" = stop ]; then
  if [ -n "$bin" ] && [ -f "$dir/cookie" ]; then
    for i in 0 1 2; do
      if running "$i"; then
        kill -CONT "$(beam_pid "$i")" 2>/dev/null || true # a frozen node cannot shut down
        ctl "$i" -q shutdown --timeout 30 >/dev/null 2>&1 || "$0" kill $((i + 1))
      fi
    done
  fi
  rm -rf "$dir"
  log "stopped"
  exit 0
fi

if [ -z "$bin" ]; then
  log "rabbitmq-server is not installed (apt-get install rabbitmq-server, or see https://www.rabbitmq.com/download.html)"
  exit 1
fi

if [ "$command" != start ] && [ ! -s "$dir/cookie" ]; then
  log "not started ('$0 start' starts it)"
  exit 1
fi

case $command in
start)
  mkdir -p "$dir/home"
  if [ ! -s "$dir/cookie" ]; then
    # A cookie of its own: these nodes can neither join nor be reached by any other node here.
    python3 -c 'import secrets; print(secrets.token_hex(20).upper(), end="")' >"$dir/cookie"
  fi
  chmod 400 "$dir/cookie"
  for i in 0 1 2; do
    running "$i" || start_node "$i"
  done
  wait_clustered
  log "cluster ready: $(all_nodes) on 127.0.0.1 ports ${ports[*]}"
  ;;
status)
  ok=0
  for i in 0 1 2; do
    if booted "$i"; then echo "$(node "$i") 127.0.0.1:${ports[$i]} running; cluster: $(members "$i")"; else echo "$(node "$i") 127.0.0.1:${ports[$i]} down"; ok=1; fi
  done
  exit $ok
  ;;
url)
  echo "amqp://guest:guest@127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}/%2F"
  ;;
kill)
  i=$((${2:?which node: 1, 2 or 3} - 1))
  for pid in "$(beam_pid "$i")" "$(launcher_pid "$i")"; do
    if alive "$pid"; then kill -KILL "$pid"; fi
  done
  for _ in $(seq 1 100); do running "$i" || break; sleep 0.05; done
  log "killed $(node "$i")"
  ;;
freeze | thaw)
  i=$((${2:?which node: 1, 2 or 3} - 1))
  pid=$(beam_pid "$i")
  alive "$pid" || { log "node $(node "$i") is not running"; exit 1; }
  if [ "$command" = freeze ]; then kill -STOP "$pid"; else kill -CONT "$pid"; fi
  log "${command} $(node "$i")"
  ;;
ctl)
  i=$((${2:?which node: 1, 2 or 3} - 1))
  shift 2
  ctl "$i" "$@"
  ;;
*)
  log "usage: $0 [start|status|url|kill N|freeze N|thaw N|ctl N ARGS...|stop]"
  exit 2
  ;;
esac

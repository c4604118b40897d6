#!/usr/bin/env bash
# A local PostgreSQL primary with a streaming standby, for the high-availability tests and for trying
# a failover by hand: primary on 127.0.0.1:5440, standby on 127.0.0.1:5441 streaming synchronously
# (PG_HA_ASYNC=1: asynchronously), trust auth on loopback, no fsync (for tests only), files under
# $PG_HA_DIR (default /tmp/order-timeouts-pg-ha).
#
#   scripts/postgresql_standby.sh [start]   start both, or check that they are up (idempotent)
#   scripts/postgresql_standby.sh status    which port serves writes, which one streams from it
#   scripts/postgresql_standby.sh restart   restart the primary (fast mode: sessions are ended, as a deploy does)
#   scripts/postgresql_standby.sh kill      stop the primary at once (as a crash would: immediate mode)
#   scripts/postgresql_standby.sh promote   make the standby the primary
#   scripts/postgresql_standby.sh stop      stop both and remove their files
#
# Clients give both hosts and let libpq find the one that takes writes:
#   postgresql://postgres@127.0.0.1:5440,127.0.0.1:5441/postgres?target_session_attrs=read-write
# PG_HA_PORTS="5440 5441" picks other ports. Run as root, the servers run as the postgres user.
set -euo pipefail

read -r primary_port standby_port <<<"${PG_HA_PORTS:-5440 5441}"
dir=${PG_HA_DIR:-${TMPDIR:-/tmp}/order-timeouts-pg-ha}
log() { echo "postgresql_standby: $*"; }

bin=${PG_BIN:-}
if [ -z "$bin" ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$bin" ] || bin=$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/pg_ctl)")
fi
[ -x "$bin/pg_ctl" ] || { log "PostgreSQL's server programs are not installed (apt-get install postgresql)"; exit 1; }

# The servers refuse to run as root: as root, everything below runs as postgres.
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
ctl() { as_owner "$bin/pg_ctl" -D "$dir/$1" -l "$dir/$1.log" -w -t 30 "${@:2}"; }
ready() { "$bin/pg_isready" -q -h 127.0.0.1 -p "$1"; }
in_recovery() { "$bin/psql" -h 127.0.0.1 -p "$1" -U postgres -d postgres -qAtc "SELECT pg_is_in_recovery()" 2>/dev/null; }

start_node() { # name, port
  ready "$2" && return 0
  ctl "$1" -o "-p $2 -k $dir" start >/dev/null || { log "$1 did not start, see $dir/$1.log"; exit 1; }
}

case "${1:-start}" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/primary/PG_VERSION" ]; then
      as_owner "$bin/initdb" -D "$dir/primary" -U postgres -A trust --no-sync >/dev/null
      cat >>"$dir/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 5
wal_keep_size = 256MB
hot_standby = on
fsync = off
full_page_writes = off
EOF
      # Synchronous replication: a commit returns once the standby has it, so a failover loses no
      # committed write (the set-up docs/operations.md recommends). PG_HA_ASYNC=1 streams asynchronously.
      if [ -z "${PG_HA_ASYNC:-}" ]; then
        echo "synchronous_standby_names = '*'" >>"$dir/primary/postgresql.conf"
      fi
    fi
    start_node primary "$primary_port"
    if [ ! -f "$dir/standby/PG_VERSION" ]; then
      # -R writes standby.signal and primary_conninfo: the copy follows the primary from then on.
      as_owner "$bin/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir/standby" -R -X stream -c fast >/dev/null
    fi
    start_node standby "$standby_port"
    log "primary on 127.0.0.1:$primary_port, standby on 127.0.0.1:$standby_port"
    ;;
  status)
    for port in "$primary_port" "$standby_port"; do
      if ! ready "$port"; then echo "127.0.0.1:$port down"
      elif [ "$(in_recovery "$port")" = t ]; then echo "127.0.0.1:$port standby"
      else echo "127.0.0.1:$port primary"; fi
    done
    ;;
  restart)
    ctl primary -m fast -o "-p $primary_port -k $dir" restart >/dev/null
    log "primary on 127.0.0.1:$primary_port restarted"
    ;;
  kill)
    ctl primary -m immediate stop >/dev/null 2>&1 || true
    log "primary on 127.0.0.1:$primary_port stopped"
    ;;
  promote)
    ctl standby promote >/dev/null
    # Alone now: waiting for a synchronous standby that no longer exists would block every commit.
    "$bin/psql" -h 127.0.0.1 -p "$standby_port" -U postgres -d postgres -qAtc \
      "ALTER SYSTEM SET synchronous_standby_names = ''" -c "SELECT pg_reload_conf()" >/dev/null
    log "standby on 127.0.0.1:$standby_port promoted"
    ;;
  stop)
    for node in primary standby; do
      [ -f "$dir/$node/postmaster.pid" ] && { ctl "$node" -m immediate stop >/dev/null 2>&1 || true; }
    done
    rm -rf "$dir"
    log "stopped"
    ;;
  *)
    log "unknown command ${1}: use start, status, restart, kill, promote or stop"
    exit 2
    ;;
esac

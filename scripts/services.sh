#!/usr/bin/env bash
# Make PostgreSQL, Redis and RabbitMQ available on 127.0.0.1 for the test suite and the bench (and faketime).
# Starts what is installed, installs with apt-get when run as root, otherwise says what is missing.
# Idempotent: services already answering are left alone.
set -u

missing=()
as_root=false; [ "$(id -u)" = 0 ] && as_root=true
have() { command -v "$1" >/dev/null 2>&1; }
log() { echo "services: $*"; }

wait_for() { # name, probe command...
  local name=$1; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && { log "$name ready"; return 0; }; sleep 1; done
  log "$name did not come up"; return 1
}

apt_install() {
  $as_root && have apt-get || return 1
  log "installing $* with apt-get"
  if [ -z "${_apt_updated:-}" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && _apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- PostgreSQL ------------------------------------------------------------------------------
pg_up() { have pg_isready && pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up; then
  if ! have pg_ctlcluster; then apt_install postgresql postgresql-client || true; fi
  if have pg_ctlcluster; then
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$version" ]; then
      pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || pg_ctlcluster "$version" main start 2>/dev/null || true
    fi
  fi
  wait_for PostgreSQL pg_up || missing+=("PostgreSQL on 127.0.0.1:5432 (apt-get install postgresql, or start your server)")
fi
if pg_up && $as_root && id postgres >/dev/null 2>&1; then
  # Fresh Debian installs ask for a password on TCP: give the postgres role the one the tests use,
  # and make sure the `test` database exists. Harmless where trust auth is configured.
  su postgres -c "psql -qAtc \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
  su postgres -c "psql -qAtc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" 2>/dev/null | grep -q 1 \
    || su postgres -c "createdb test" >/dev/null 2>&1 || true
fi

# --- Redis -----------------------------------------------------------------------------------
redis_up() { have redis-cli && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
if ! redis_up; then
  have redis-server || apt_install redis-server redis-tools || true
  if have redis-server; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  fi
  wait_for Redis redis_up || missing+=("Redis on 127.0.0.1:6379 (apt-get install redis-server)")
fi
# The HA tests run Redis under Sentinel (scripts/redis_sentinel.sh). Debian ships redis-sentinel
# apart from redis-server; the script falls back to `redis-server --sentinel`, the same program.
if have redis-server && ! have redis-sentinel; then
  apt_install redis-sentinel || log "redis-sentinel is not installed: scripts/redis_sentinel.sh runs 'redis-server --sentinel'"
fi

# --- RabbitMQ --------------------------------------------------------------------------------
rabbit_up() { port_open 5672 && { ! have rabbitmq-diagnostics || rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }; }
if ! rabbit_up; then
  have rabbitmq-server || apt_install rabbitmq-server || true
  if have rabbitmq-server; then rabbitmq-server -detached >/dev/null 2>&1 || true; fi
  wait_for RabbitMQ rabbit_up || missing+=("RabbitMQ on 127.0.0.1:5672 (apt-get install rabbitmq-server)")
fi

# --- kubectl: tests/integration/test_k8s.py renders docker/k8s with `kubectl kustomize` -----------
if ! have kubectl; then
  apt_install kubernetes-client || log "kubectl is missing (apt-get install kubernetes-client): the docker/k8s tests will be skipped, or fail with CI=true"
fi

# --- openssl: the TLS tests make their certificates with it ----------------------------------
if ! have openssl; then
  apt_install openssl || log "openssl is missing (apt-get install openssl): the TLS tests will be skipped, or fail with CI=true"
fi

# --- faketime: the clock-skew tests run worker processes on a clock minutes off ----------------
if ! have faketime; then
  apt_install faketime || log "faketime is missing (apt-get install faketime): the clock-skew tests will be skipped, or fail with CI=true"
fi

if [ ${#missing[@]} -gt 0 ]; then
  log "missing, and not installable here (run as root with apt-get, or start them yourself):"
  for m in "${missing[@]}"; do echo "  - $m"; done
  exit 1
fi
log "PostgreSQL, Redis and RabbitMQ are available on 127.0.0.1"

#!/usr/bin/env bash
# Make sure the local Redis and PostgreSQL the worker and its tests use are up.
set -euo pipefail

if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi

if [ "${CASCADE_NEEDS_POSTGRES:-1}" = 1 ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi

# The compose file is validated by Debian's docker-compose (no Docker engine is needed).
if [ "${CASCADE_NEEDS_COMPOSE:-1}" = 1 ] && ! command -v docker-compose >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi

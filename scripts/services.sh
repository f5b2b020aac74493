#!/usr/bin/env bash
# Make sure what the worker and its tests use is there. As root on Debian/Ubuntu, missing
# packages are installed and servers started; otherwise a missing one is named and left to
# you. The tests start a redis-server of their own (they need only the binary); the demo
# uses the Redis at BROKER_URL. Docker Compose is optional: tests/test_compose.py skips
# with a reason when it is missing and cannot be installed.
set -euo pipefail

can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
need() {  # need COMMAND PACKAGE: install it as root, else stop naming the package
  command -v "$1" >/dev/null && return
  can_install || { echo "$1 is missing: install the $2 package" >&2; exit 1; }
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

need redis-server redis-server
if [ "${CASCADE_NEEDS_REDIS:-0}" = 1 ] && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "no Redis at 127.0.0.1:6379: start redis-server" >&2; exit 1; }
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi

if [ "${CASCADE_NEEDS_POSTGRES:-1}" = 1 ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  command -v pg_ctlcluster >/dev/null && [ "$(id -u)" = 0 ] || {
    echo "no PostgreSQL at 127.0.0.1:5432 (trust auth for user postgres): start it" >&2; exit 1; }
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi

# tests/test_compose.py validates docker-compose.yml with Debian's docker-compose (no engine).
if [ "${CASCADE_NEEDS_COMPOSE:-1}" = 1 ] && ! command -v docker-compose >/dev/null && can_install; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi

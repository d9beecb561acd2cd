#!/usr/bin/env bash
# Installs what the tests need and a fresh Debian machine lacks. Idempotent and quiet
# when everything is present; uses apt (root) or sudo.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure-deps: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts a system cluster on install; tests use their own.
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi

#!/usr/bin/env bash
# Make sure the services the integration tests use are running on this machine:
# PostgreSQL on 127.0.0.1:5432 (trust auth). Installs it from Debian's packages when missing
# (as root), starts the cluster when it is installed but stopped. With DATABASE_URL set, the
# tests use that server instead and nothing is started here.
set -euo pipefail

say() { echo "ensure-services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

pg_up() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; }

if [ -n "${DATABASE_URL:-}" ]; then
  say "DATABASE_URL is set; using that PostgreSQL"
elif pg_up; then
  say "PostgreSQL is accepting connections on 127.0.0.1:5432"
else
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    say "installing PostgreSQL from Debian's packages"
    as_root apt-get update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client \
      || { say "cannot install PostgreSQL: run 'sudo apt-get install postgresql' or set DATABASE_URL"; exit 1; }
  fi
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -n "$version" ]; then
    conf=/etc/postgresql/$version/main
    # Tests connect over TCP as user postgres without a password (loopback only).
    if ! grep -q "dicom_assets" "$conf/pg_hba.conf" 2>/dev/null; then
      as_root sed -i '1i # dicom_assets tests: trust on loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf" || true
    fi
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || as_root pg_ctlcluster "$version" main start || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { say "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
  say "PostgreSQL started"
fi

#!/usr/bin/env bash
# A private, throwaway PostgreSQL server for tests, living entirely inside one folder.
#
#   bash scripts/postgres.sh start DIR   # prints postgresql+psycopg2://postgres@127.0.0.1:PORT/autopeft_test
#   bash scripts/postgres.sh stop DIR    # stops the server whose data lives in DIR/data, and no other
#
# The server listens on 127.0.0.1 only, on a free port, with its unix socket in DIR (never in a system folder),
# and trusts every loopback connection: it is a test server in a temporary folder, not a place for real data.
# Only the URL goes to stdout; progress and errors go to stderr. When initdb/pg_ctl are missing, Debian's
# `postgresql` package is installed first (as root). PostgreSQL refuses to run as root, so as root the server
# runs as the `postgres` user and DIR is handed to that user.
set -euo pipefail

DATABASE=autopeft_test

die() { echo "postgres.sh: $*" >&2; exit 1; }

usage() { die "usage: postgres.sh start DIR | stop DIR"; }

# The folder holding initdb and pg_ctl: the ones on PATH, else the newest under /usr/lib/postgresql (Debian keeps
# the server binaries there, off PATH). Prints nothing when there are none.
find_bindir() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return
  fi
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
    echo "$dir"
  fi
}

install_postgres() {
  [ "$(id -u)" = 0 ] || die "initdb and pg_ctl are missing; install PostgreSQL (apt-get install postgresql) or run as root"
  command -v apt-get >/dev/null || die "initdb and pg_ctl are missing and apt-get is not available to install PostgreSQL"
  echo "postgres.sh: installing PostgreSQL with apt-get" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
}

# Run a command as the user that owns the server: `postgres` when we are root, ourselves otherwise.
as_owner() {
  if [ "$(id -u)" != 0 ]; then
    "$@"
  elif command -v runuser >/dev/null; then
    runuser -u postgres -- "$@"
  else
    su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

# A port nothing on 127.0.0.1 answers on; the start is retried with another if the server still cannot bind it.
pick_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

start() {
  local dir="$1" bindir port attempt url
  bindir="$(find_bindir)"
  if [ -z "$bindir" ]; then
    install_postgres
    bindir="$(find_bindir)"
    [ -n "$bindir" ] || die "PostgreSQL was installed but no initdb/pg_ctl was found under /usr/lib/postgresql/*/bin"
  fi
  dir="$(realpath -m "$dir")"
  # The unix socket path (DIR/.s.PGSQL.PORT) must fit the kernel's 107-byte limit.
  [ "${#dir}" -le 90 ] || die "$dir is too long for a unix socket path (${#dir} characters; at most 90); use a folder such as \$(mktemp -d /tmp/pg-XXXXXX)"
  [ ! -e "$dir/data" ] || die "$dir/data already exists; start needs a folder without a server in it"
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "there is no 'postgres' user to run the server as (PostgreSQL refuses to run as root)"
    chown postgres: "$dir"
    chmod 700 "$dir"
    as_owner test -w "$dir" || die "the postgres user cannot write to $dir (is a parent folder private to root?); use a folder such as \$(mktemp -d /tmp/pg-XXXXXX)"
  fi
  # The server's own cwd must be readable by its user; the caller's may be private to root.
  cd "$dir"

  echo "postgres.sh: initdb $dir/data ($bindir)" >&2
  as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed for $dir/data"; }

  for attempt in 1 2 3 4 5; do
    port="$(pick_port)"
    # Durability settings are off: a test server's data is thrown away with its folder.
    if as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2; then
      break
    fi
    # A crashed start leaves no postmaster.pid; a port taken between the check and the bind is worth a retry.
    grep -q "could not bind\|Address already in use" "$dir/server.log" 2>/dev/null && [ "$attempt" -lt 5 ] \
      || { tail -n 20 "$dir/server.log" >&2 2>/dev/null || true; die "pg_ctl could not start the server in $dir/data"; }
    echo "postgres.sh: port $port was taken, trying another" >&2
  done
  echo "$port" >"$dir/port"

  "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$DATABASE" >&2 \
    || die "the server in $dir/data started but createdb $DATABASE failed (see $dir/server.log)"
  url="postgresql+psycopg2://postgres@127.0.0.1:$port/$DATABASE"
  echo "postgres.sh: server for $dir is up: $url" >&2
  echo "$url"
}

stop() {
  local dir="$1" bindir
  if [ ! -f "$dir/data/postmaster.pid" ]; then
    echo "postgres.sh: no server is running in $dir/data" >&2
    return 0
  fi
  bindir="$(find_bindir)"
  [ -n "$bindir" ] || die "pg_ctl is missing; cannot stop the server in $dir/data"
  dir="$(realpath "$dir")"
  cd "$dir"
  # pg_ctl signals the postmaster recorded in DIR/data/postmaster.pid: exactly this server, no other.
  as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2
}

[ $# -eq 2 ] || usage
case "$1" in
  start) start "$2" ;;
  stop) stop "$2" ;;
  *) usage ;;
esac

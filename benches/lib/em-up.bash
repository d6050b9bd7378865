# benches/lib/em-up.bash: what a benchmark on `em up` needs, sourced by benches/processes: the
# binaries of BENCH_PROFILE, a work directory cleaned on exit, timing and waiting helpers, and
# `em up` started on free ports with em's config and data under the work directory.
# The sourcing script sets `bench` (its name, for messages) first, and may define `before_up`. Sets: py, bin, work, pids,
# port_base, http_port, repo_url, beacon_url, status_url, token, data; defines die, now,
# wait_for, get, stop_pid, copy_app.
# The variables are for the sourcing script:
# shellcheck disable=SC2034
: "${bench:?set bench (the name of the benchmark) before sourcing benches/lib/em-up.bash}"

profile=${BENCH_PROFILE:-release}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/platformx/target}"
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "benches/$bench: $*" >&2; exit 1; }
# The interpreter itself, not a version manager's shim: the helpers start faster.
py=$(python3 -c 'import sys; print(sys.executable)')

case $profile in
  release)
    echo "building em (release)"
    cargo build --release --quiet -p px-em --bin em
    bin="$CARGO_TARGET_DIR/release"
    ;;
  debug)
    bin="$CARGO_TARGET_DIR/debug"
    [[ -x $bin/em ]] || die "BENCH_PROFILE=debug uses the test run's binaries, but there is no $bin/em; run \`cargo build -p px-em\` first, or use BENCH_PROFILE=release"
    ;;
  *) die "BENCH_PROFILE is release or debug, not ${profile@Q}" ;;
esac

work=$(mktemp -d "${TMPDIR:-/var/tmp}/px-bench-$bench.XXXXXX")
pids=()
# stop_pid PID: SIGTERM, then up to 60 s for it to exit, then SIGKILL.
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -KILL "$pid" 2>/dev/null; then
    echo "benches/$bench: pid $pid did not stop within 60 s of SIGTERM; killed" >&2
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 50 ms until it succeeds.
wait_for() {
  local limit=$1 what=$2
  shift 2
  for _ in $(seq $((limit * 20))); do "$@" && return 0; sleep 0.05; done
  die "timed out after ${limit}s waiting for $what"
}

# get URL [HOST] [TOKEN]: the body of a GET, with a Host header and a bearer token if given.
cat > "$work/get.py" <<'PY'
import sys
import os
import ssl
import urllib.request

url, host, token = (sys.argv[1:] + ["", ""])[:3]
request = urllib.request.Request(url)
if host:
    request.add_header("Host", host)
if token:
    request.add_header("Authorization", f"Bearer {token}")
# em up serves its APIs over HTTPS with a CA of its own (data/pki/ca.pem), named by
# PX_BENCH_CA once em up made it.
handlers = [urllib.request.ProxyHandler({})]
if os.environ.get("PX_BENCH_CA"):
    handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=os.environ["PX_BENCH_CA"])))
opener = urllib.request.build_opener(*handlers)
sys.stdout.buffer.write(opener.open(request, timeout=30).read())
PY
get() { "$py" "$work/get.py" "$@"; }

# copy_app EXAMPLE NAME: examples/EXAMPLE under the work directory, its app named NAME; sets
# app_dir to where.
copy_app() {
  app_dir="$work/apps/$2"
  mkdir -p "$work/apps"
  cp -r "examples/$1" "$app_dir"
  sed -i "s/^name = \".*\"$/name = \"$2\"/" "$app_dir/app.toml"
  grep -q "^name = \"$2\"$" "$app_dir/app.toml" || die "cannot name $app_dir/app.toml's app $2"
}

read -r port_base http_port < <("$py" - <<'PY'
import random, socket
def bindable(port):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
while True:
    # Four consecutive ports for em up's services, and the apps' port; below the ephemeral
    # range and below the apps' own ports (19000-29999).
    base = random.randrange(10000, 18990)
    http = random.randrange(10000, 19000)
    if all(bindable(base + i) for i in range(4)) and bindable(http) and not base <= http < base + 4:
        print(base, http)
        break
PY
)
# em's config and em up's data under the work directory.
export XDG_CONFIG_HOME="$work/config" XDG_DATA_HOME="$work/data" PX_LOG=warn
export PX_BENCH_CA="$work/data/platformx/pki/ca.pem"
# The apps get Maestro's PATH: the interpreter itself first, not a version manager's shim.
PATH="$(dirname "$py"):$PATH"
data="$XDG_DATA_HOME/platformx"
# The offsets of crates/em/src/up.rs: apprepo, Beacon's API, Beacon's links, Maestro's status.
repo_url="https://127.0.0.1:$port_base"
beacon_url="https://127.0.0.1:$((port_base + 1))"
status_url="http://127.0.0.1:$((port_base + 3))"
# A sourcing script may define before_up: run once the ports are chosen, before em up starts
# (benches/acme starts Pebble there, which must know em up's HTTP port, and sets EM_UP_ARGS).
if declare -F before_up > /dev/null; then before_up; fi
echo "starting em up (apps on port $http_port, services from port $port_base)"
# EM_UP_ARGS: more words for `em up` (benches/sandbox passes --no-sandbox).
read -ra up_args <<< "${EM_UP_ARGS:-}"
"$bin/em" up --http-port "$http_port" --port-base "$port_base" "${up_args[@]}" > "$work/up.log" 2>&1 &
up_pid=$!
pids+=("$up_pid")
up_running() {
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; die "em up exited"; }
  [[ -f $XDG_CONFIG_HOME/em/config.toml ]] && get "$status_url/healthz" > /dev/null 2>&1
}
wait_for 60 "em up to be ready" up_running
token=$(< "$data/secrets/deploy-token")

# benches/lib/proxy-load.bash: runs one case of benches/proxy against one target and reads the
# load generator's figures: wrk over HTTP or HTTPS (HTTP/1.1), h2load over HTTPS (HTTP/2).
# Sourced by benches/proxy with host, duration, warmup, H2_STREAMS and fail set.
# The variables come from benches/proxy:
# shellcheck disable=SC2154

# cpu_ticks PID...: user + system clock ticks the processes (all their threads) have used.
cpu_ticks() {
  local p total=0
  for p in "$@"; do
    total=$((total + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo "$total"
}
clk_tck=$(getconf CLK_TCK)

# wrk_run SECONDS OUT URL THREADS CONNECTIONS CLOSE (1: a new connection per request).
wrk_run() {
  local seconds=$1 out=$2 url=$3 t=$4 c=$5 close=$6
  local -a args=(-t "$t" -c "$c" -d "${seconds}s" --latency -H "Host: $host")
  if ((close)); then args+=(-H "Connection: close"); fi
  wrk "${args[@]}" "$url" > "$out"
}

# h2load_run SECONDS OUT URL THREADS CONNECTIONS: kept-alive HTTP/2 connections for SECONDS.
h2load_run() {
  local seconds=$1 out=$2 url=$3 t=$4 c=$5
  h2load -t "$t" -c "$c" -m "$H2_STREAMS" -D "$seconds" -H ":authority: $host" "$url" > "$out"
}

# h2load_bursts SECONDS OUT URL THREADS CLIENTS: bursts of CLIENTS new HTTP/2 connections, each
# sending one request and closing, until SECONDS have passed (at least one burst); every
# burst's output is appended to OUT.
h2load_bursts() {
  local seconds=$1 out=$2 url=$3 t=$4 c=$5 end
  end=$(($(date +%s%N) + seconds * 1000000000))
  : > "$out"
  # h2load runs at most as many threads as clients.
  ((t <= c)) || t=$c
  while true; do
    h2load -t "$t" -c "$c" -n "$c" -m 1 -H ":authority: $host" "$url" >> "$out"
    (($(date +%s%N) < end)) || break
  done
}

# run_case OUT MODE PORT PATH "PIDS" THREADS CONNECTIONS: a warm-up, then the measured run into
# OUT, and the CPU ticks PIDS used during the measured run into OUT.cpu.
run_case() {
  local out=$1 mode=$2 port=$3 path=$4 t=$6 c=$7 t0 t1 scheme=https run
  local -a proc
  read -ra proc <<< "$5"
  case $mode in
    keep-alive) scheme=http run="wrk_run" ;;
    close) scheme=http run="wrk_run" ;;
    tls-keep-alive | tls-close) run="wrk_run" ;;
    h2) run="h2load_run" ;;
    h2-new) run="h2load_bursts" ;;
    *) fail "unknown case mode $mode" ;;
  esac
  local url="$scheme://127.0.0.1:$port/$path"
  local -a extra=()
  if [[ $run == wrk_run ]]; then
    extra=(0)
    if [[ $mode == *close ]]; then extra=(1); fi
  fi
  if ((warmup > 0)); then "$run" "$warmup" "$out.warmup" "$url" "$t" "$c" "${extra[@]}"; fi
  t0=$(cpu_ticks "${proc[@]}")
  "$run" "$duration" "$out" "$url" "$t" "$c" "${extra[@]}"
  t1=$(cpu_ticks "${proc[@]}")
  echo $((t1 - t0)) > "$out.cpu"
}

# parse_case OUT MODE: "req/s p50_us p99_us errors cpu_us_per_request" (errors: non-2xx answers
# plus socket errors, or h2load's failed, errored and timed-out requests; CPU: the proxy's user
# + system time over the requests completed). h2load gives no percentiles: p50 and p99 are -1.
parse_case() {
  case $2 in
    h2 | h2-new) parse_h2load "$1" ;;
    *) parse_wrk "$1" ;;
  esac
}
parse_wrk() {
  awk -v ticks="$(cat "$1.cpu")" -v hz="$clk_tck" '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return (v + 0) * 1000
      if (v ~ /s$/) return (v + 0) * 1000000
      return v + 0
    }
    /Requests\/sec:/ { rps = $2 }
    / requests in / { n = $1 }
    /^ +50%/ { p50 = us($2) }
    /^ +99%/ { p99 = us($2) }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
    END { printf "%s %.0f %.0f %d %.1f\n", rps, p50, p99, err, n ? ticks * 1000000 / hz / n : 0 }
  ' "$1"
}
# Sums over every h2load run in OUT (one, or one per burst): requests done over the time the
# runs took by h2load's own clock, which leaves out h2load's start-up between bursts. A run
# that did not negotiate h2 counts all its requests as errors.
parse_h2load() {
  awk -v ticks="$(cat "$1.cpu")" -v hz="$clk_tck" '
    function secs(v) {
      if (v ~ /ms,?$/) return (v + 0) / 1000
      if (v ~ /us,?$/) return (v + 0) / 1000000
      return v + 0
    }
    /^Application protocol:/ { h2 = ($3 == "h2") }
    /^finished in / { t += secs($3) }
    /^requests: / {
      # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
      run_done = $6; n += run_done
      err += $10 + $12 + $14 + (h2 ? 0 : run_done)
    }
    # status codes: N 2xx, N 3xx, N 4xx, N 5xx
    /^status codes: / { err += $7 + $9 }
    END { printf "%.2f -1 -1 %d %.1f\n", t ? n / t : 0, err, n ? ticks * 1000000 / hz / n : 0 }
  ' "$1"
}

# lat MICROSECONDS: "512us" or "1.23ms"; "n/a" for a figure the tool does not give (-1).
lat() { awk -v v="$1" 'BEGIN { if (v < 0) print "n/a"; else if (v < 1000) printf "%dus", v; else printf "%.2fms", v / 1000 }'; }

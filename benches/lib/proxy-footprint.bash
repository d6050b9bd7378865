# benches/lib/proxy-footprint.bash: (f) Maestro's idle RSS with an empty assignment and (g) the
# time from spawn to the first 404 its proxy answers, for `maestro` and `proxy-only`; sourced by
# benches/proxy after its load runs, with work, bin, pids, up_port, host, threads, cold_runs,
# free_port and wait_port set. Sets idle_rss (KiB) and mc_*/pc_* (ms: min, median, max).
# The variables set here are for the sourcing script, and those it sets are used here:
# shellcheck disable=SC2034,SC2154

mdir=$work/maestro
mkdir -p "$mdir/state" "$mdir/log"
printf '{"generation": 1, "apps": []}\n' > "$mdir/state/assignment.json"
m_http=$(free_port)
m_status=$(free_port)
cat > "$mdir/maestro.toml" <<EOF
node_name = "bench"
http_listen = "127.0.0.1:$m_http"
status_listen = "127.0.0.1:$m_status"
state_dir = "$mdir/state"
log_dir = "$mdir/log"
EOF
"$maestro_bin" --config "$mdir/maestro.toml" 2> "$mdir/stderr" &
m_pid=$!
pids+=("$m_pid")
wait_port "$m_http"
sleep 2
idle_rss=$(awk '/VmRSS/ {print $2}' "/proc/$m_pid/status")
kill "$m_pid"
wait "$m_pid" 2>/dev/null || true
forget() { local p kept=(); for p in "${pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done; pids=("${kept[@]}"); }
forget "$m_pid"
grep -q 'serving the persisted assignment' "$mdir/stderr" || { echo "maestro did not load the empty assignment:" >&2; cat "$mdir/stderr" >&2; exit 1; }

# cold PORT CMD...: spawns CMD COLD_RUNS times, each time timing from just before the spawn to
# the first complete "404" status line its proxy sends; prints "min median max" in ms.
cold() {
  python3 - "$cold_runs" "$@" <<'EOF'
import socket, statistics, subprocess, sys, time
runs, port, cmd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
req = b"GET / HTTP/1.1\r\nHost: cold.invalid\r\nConnection: close\r\n\r\n"
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if p.poll() is not None:
                sys.exit(f"{cmd[0]} exited with {p.returncode} before answering")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(req)
                    head = s.recv(64)
            except OSError:
                time.sleep(0.0002)
                continue
            if head.startswith(b"HTTP/1.1 404"):
                times.append((time.perf_counter() - t0) * 1000)
                break
            sys.exit(f"unexpected answer {head!r}")
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
print(f"{min(times):.1f} {statistics.median(times):.1f} {max(times):.1f}")
EOF
}
read -r mc_min mc_med mc_max < <(cold "$m_http" "$maestro_bin" --config "$mdir/maestro.toml")
cold_port=$(free_port)
read -r pc_min pc_med pc_max < <(cold "$cold_port" "$bin/proxy-only" --listen "127.0.0.1:$cold_port" \
  --upstream "127.0.0.1:$up_port" --host "$host" --threads "$threads")


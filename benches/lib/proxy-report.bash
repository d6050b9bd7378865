# benches/lib/proxy-report.bash: benches/proxy's tables and its rows for benches/run, from the
# figures its runs left in `result` (per case and target: "req/s p50_us p99_us errors
# cpu_us_per_request"); sourced last, with every figure of the script set.
# The variables come from benches/proxy:
# shellcheck disable=SC2154

row() {
  local id=$1 label=$2 n=$3 m=$4
  local nr np50 np99 ne nc mr mp50 mp99 me mc ratio verdict
  read -r nr np50 np99 ne nc <<< "${result[$id,$n]}"
  read -r mr mp50 mp99 me mc <<< "${result[$id,$m]}"
  ratio=$(awk -v a="$mr" -v b="$nr" 'BEGIN { printf "%.2f", a / b }')
  # A p99 the tool does not give (-1) is not compared.
  verdict=$(awk -v a="$mr" -v b="$nr" -v p="$mp99" -v q="$np99" 'BEGIN {
    slow = p >= 0 && q >= 0 && p > q
    if (a >= b && !slow) print "met"; else if (a < b && slow) print "no: req/s, p99"; else if (a < b) print "no: req/s"; else print "no: p99" }')
  if ((ne + me)); then verdict="$verdict (errors: nginx $ne, $m $me)"; fi
  printf '| %s %-52s | %18s | %18s | %5s | %20s | %20s | %13s | %s |\n' "$id" "$label" "$nr" "$mr" "$ratio" \
    "$(lat "$np50")/$(lat "$np99")" "$(lat "$mp50")/$(lat "$mp99")" "$nc/$mc" "$verdict"
}
dashes() { printf -- '-%.0s' $(seq "$1"); }
# table NGINX_TARGET OTHER_TARGET MODES [PATH]: one row per case whose mode is one of MODES
# (words; and whose path is PATH, when given).
table() {
  local n=$1 m=$2 modes=" $3 " only=${4:-}
  printf '| %-54s | %18s | %18s | %5s | %20s | %20s | %13s | %s |\n' "case" "$n req/s" "$m req/s" "ratio" "$n p50/p99" "$m p50/p99" "CPU us/req" "§6 goal"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' "$(dashes 56)" "$(dashes 20)" "$(dashes 20)" "$(dashes 7)" "$(dashes 22)" "$(dashes 22)" "$(dashes 15)" "$(dashes 9)"
  for c in "${cases[@]}"; do
    IFS='|' read -r id label path _ _ mode <<< "$c"
    if [[ $modes == *" $mode "* ]] && [[ -z $only || $path == "$only" ]]; then row "$id" "$label" "$n" "$m"; fi
  done
}
plain_modes="keep-alive close"
tls_modes="tls-keep-alive tls-close h2 h2-new"

echo
echo "== Maestro vs nginx proxy_pass, same app instance, one run ($(date -u +%Y-%m-%dT%H:%MZ)) =="
echo "machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "tools: $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}' || true), $(h2load --version 2>&1 | head -1)"
echo "load generators, proxies and the app all share this machine's ${threads} cores: absolute"
echo "figures are low and noisy; read the ratios, and rerun before trusting a difference of a few %."
echo "maestro = the real maestro binary ($profile build), one proxy worker thread per core, access log"
echo "          to log_dir/access.log (the default), serving app 'bench' v1 from its persisted"
echo "          assignment: the bundle downloaded from a real apprepo, the instance in its sandbox."
echo "nginx   = $(nginx -v 2>&1 | sed 's/^nginx version: //'): worker_processes $threads, proxy_pass http://up (the same instance);"
echo "          upstream keepalive 64; proxy_http_version 1.1; Connection \"\"; the same"
echo "          Host/X-Forwarded-*/X-Request-Id rewrite as Maestro; access_log on (to a file,"
echo "          Maestro's fields); proxy_buffering on (nginx's default); keepalive_requests 1000000."
echo "app     = nginx, worker_processes 1, access_log off, started by Maestro on \$PORT: /small"
printf '%s\n' "          returns \"hello\\n\" (6 B), /1m is a 1 MiB file (sendfile)."
echo "HTTPS   = one ECDSA P-256 certificate and key on both (_default in Maestro's certs_dir; nginx"
echo "          'listen ssl http2', ssl_protocols TLSv1.2 TLSv1.3, its other TLS settings the defaults);"
echo "          both offer ALPN h2 and http/1.1."
echo "runs    = ${warmup}s warm-up, then ${duration}s measured; nginx and maestro back to back, order"
echo "          alternating between cases. wrk -H 'Host: $host' --latency; h2load -H ':authority: $host'"
echo "          (no percentiles: p50/p99 n/a); (k) repeats bursts of $handshake_clients new clients, one request each."
echo "CPU us/req: the proxy's own user + system time (nginx: its workers; maestro: the process)"
echo "          per completed request, from /proc; less sensitive to other load than req/s."
echo "load average (1 min) just before the runs: $load_before (other work on the machine)."
echo
echo "HTTP, through the real maestro:"
table nginx maestro "$plain_modes"
echo
echo "HTTPS (HTTP/1.1 with wrk, HTTP/2 with h2load), through the real maestro's TLS listener:"
table nginx-tls maestro-tls "$tls_modes"
# tls_of OUT: the TLS version and cipher h2load negotiated.
tls_of() { awk -F': ' '/^TLS Protocol:/ { p = $2 } /^Cipher:/ { c = $2 } END { print p, c }' "$1"; }
echo "h2load negotiated: maestro $(tls_of "$work/load-j-maestro-tls"), nginx $(tls_of "$work/load-j-nginx-tls")."
printf 'nginx'"'"'s access log (TLS version, requests on a resumed session):'
for c in "${cases[@]}"; do
  IFS='|' read -r id _ _ _ _ mode <<< "$c"
  if ! plain_case "$mode"; then printf ' (%s) %s;' "$id" "${tls_seen[$id]}"; fi
done
echo
echo "wrk resumes the TLS session on each new connection, so (i) is mostly abbreviated handshakes;"
echo "h2load never resumes, so (k) is full handshakes. Maestro (rustls) keeps sessions too."
echo
echo "HTTP, through proxy-only ($(head -1 "$work/proxy-only-file/stdout" | sed 's/^proxy-only: //')):"
table nginx proxy-only "$plain_modes"
if [[ $variants == 1 ]]; then
  echo
  echo "access log off on both sides (nginx access_log off; proxy-only --access-log off):"
  table nginx-nolog proxy-only-off "$plain_modes"
  echo
  echo "1 MiB answers against nginx with proxy_buffering off (streaming like Maestro, access_log on):"
  table nginx-nobuf proxy-only "$plain_modes" 1m
  echo
  echo "1 MiB answers against nginx with 64 KiB proxy buffers (proxy_buffers 16 64k; the default is"
  echo "8 x 4 KiB), access_log on:"
  table nginx-buf64k proxy-only "$plain_modes" 1m
  echo
  echo "proxy-only access-log modes, req/s and proxy CPU us/req (file = the service's writer;"
  echo "null = records formatted and discarded; off = AccessLog::disabled):"
  mode_cell() { awk '{ printf "%s / %s", $1, $5 }' <<< "${result[$1,$2]}"; }
  printf '| %-42s | %21s | %21s | %21s |\n' "case" "file" "null" "off"
  printf '|%s|%s|%s|%s|\n' "$(dashes 44)" "$(dashes 23)" "$(dashes 23)" "$(dashes 23)"
  for c in "${cases[@]}"; do
    IFS='|' read -r id label _ _ _ mode <<< "$c"
    plain_case "$mode" || continue
    printf '| %s %-40s | %21s | %21s | %21s |\n' "$id" "$label" \
      "$(mode_cell "$id" proxy-only)" "$(mode_cell "$id" proxy-only-null)" "$(mode_cell "$id" proxy-only-off)"
  done
fi
echo
echo "(f) maestro idle RSS: $((idle_rss / 1024)).$(( (idle_rss % 1024) * 10 / 1024 )) MiB (VmRSS, real maestro binary, empty assignment,"
echo "    no beacon, 2 s after its proxy port opened; §6 goal: under 20 MiB)"
echo "    peak RSS after all runs above (VmHWM): maestro serving the app $((mae_hwm / 1024)) MiB,"
echo "    proxy-only (access log to file) $((po_hwm / 1024)) MiB"
echo "(g) spawn to first 404 answered by its proxy (an empty assignment, so no app starts; this is"
echo "    not the §6 'cold start to ready' with an app), ${cold_runs} spawns each, min/median/max:"
echo "    maestro binary:    ${mc_min} / ${mc_med} / ${mc_max} ms"
echo "    proxy-only binary: ${pc_min} / ${pc_med} / ${pc_max} ms"

# ---- rows for benches/run: every case through the real maestro against nginx, then cases a-e
# through proxy-only; §6: req/s at least nginx's and p99 no worse, in one run.
ms() { awk -v v="$1" 'BEGIN { printf (v < 10000 ? "%.2f ms" : "%.1f ms"), v / 1000 }'; }
figure() {
  local rps p50 p99 err cpu
  read -r rps p50 p99 err cpu <<< "$1"
  printf '%.0f req/s' "$rps"
  if ((p99 >= 0)); then printf ', p50 %s, p99 %s' "$(ms "$p50")" "$(ms "$p99")"; fi
  printf ', %s us CPU/req' "$cpu"
  if ((err)); then printf ', %s errors' "$err"; fi
}
# goal_row ID LABEL NGINX_TARGET TARGET WHAT: one TSV row; WHAT names the target in the case.
goal_row() {
  local id=$1 label=$2 n=$3 m=$4 what=$5 nr np99 ne mr mp99 me ratio goal why=()
  read -r nr _ np99 ne _ <<< "${result[$id,$n]}"
  read -r mr _ mp99 me _ <<< "${result[$id,$m]}"
  ratio=$(awk -v a="$mr" -v b="$nr" 'BEGIN { printf "%.2f", a / b }')
  if awk -v a="$mr" -v b="$nr" 'BEGIN { exit !(a < b) }'; then why+=("req/s ${ratio}x"); fi
  if ((mp99 >= 0 && np99 >= 0 && mp99 > np99)); then why+=("p99 $(ms "$mp99") > $(ms "$np99")"); fi
  if ((ne + me)); then why+=("errors: nginx $ne, $m $me"); fi
  if ((${#why[@]})); then printf -v goal '%s; ' "${why[@]}"; goal="not met (${goal%; })"; else goal=met; fi
  tsv_row proxy "($id) $label, $what, ratio of req/s" "$(figure "${result[$id,$m]}")" \
    "nginx: $(figure "${result[$id,$n]}")" "${ratio}x" "$goal"
}
for c in "${cases[@]}"; do
  IFS='|' read -r id label _ _ _ mode <<< "$c"
  if plain_case "$mode"; then
    goal_row "$id" "$label" nginx maestro "maestro serving an app"
  else
    goal_row "$id" "$label" nginx-tls maestro-tls "maestro's TLS listener"
  fi
done
for c in "${cases[@]}"; do
  IFS='|' read -r id label _ _ _ mode <<< "$c"
  if plain_case "$mode"; then goal_row "$id" "$label" nginx proxy-only "proxy-only harness"; fi
done

spooled=$(grep -c 'buffered to a temporary file' "$work/nginx/error.log" || true)
echo "nginx (proxy_buffering on) answers spooled to a temporary file: $spooled"
warns=$(cat "$work"/proxy-only-*/stderr "$mae_dir/stderr" | grep -c -E ' (WARN|ERROR) ' || true)
echo "maestro and proxy-only warnings/errors logged during the runs: $warns"
echo "maestro access.log lines: $mae_logged"
if ((quick)); then echo "proxy sanity: every target answered 200 with the right body over each protocol, no run had an error"; fi

# benches/lib/proxy-deploy.bash: a deployed app served by the real `maestro` binary, for
# benches/proxy, which sources it after setting work, bin, pids, host, free_port, wait_port and
# fail. Sets: app_port (the app instance's own port, the upstream of every proxy in the bench),
# mae_http_port, mae_https_port, mae_pid, mae_dir, tls_dir (_default.crt/.key, ECDSA P-256,
# which nginx's `ssl` server uses too).
#
# Why this way: `em up` runs Maestro inside the `em` process and has no TLS listener, so it can
# neither show the `maestro` binary's figures nor the HTTPS rows. Instead the app goes the way
# Beacon sends it: a real apprepo (disk storage, plain HTTP on loopback) stores the uploaded
# bundle; Maestro, without [beacon], serves its persisted assignment (state_dir/assignment.json,
# what Beacon's last assignment leaves there), written here from apprepo's own release record
# as Beacon writes it; Maestro downloads the bundle with a read token, checks its SHA-256,
# unpacks it and starts the instance in its sandbox, exactly as on a web server. The app is
# nginx serving the two answers on $PORT, so both proxies forward to the same instance.
# The variables set here are for the sourcing script, and those it sets are used here:
# shellcheck disable=SC2034,SC2154

# Limits of the set-up, each a wait for one step.
DEPLOY_WAIT_SECONDS=60

# ---- the app: nginx on $PORT, /small (6 bytes) and /1m (1 MiB) -------------------------------
app_src=$work/app
mkdir -p "$app_src/www"
head -c $((1024 * 1024)) /dev/urandom > "$app_src/www/1m"
cat > "$app_src/app.toml" <<'EOF'
# The upstream of benches/proxy: nginx serving a 6-byte answer and a 1 MiB file on $PORT.
name = "bench"
run = "exec sh ./serve.sh \"$1\""

[health]
path = "/small"
EOF
cat > "$app_src/serve.sh" <<EOF
#!/bin/sh
# Writes nginx's config for this instance's port into a private temporary directory (the
# release is read-only) and runs nginx in the foreground as the instance's process.
set -eu
port=\$1
dir=\$(mktemp -d)
mkdir -p "\$dir/tmp"
user_line=""
if [ "\$(id -u)" = 0 ]; then user_line="user root;"; fi
sed -e "s|@PORT@|\$port|" -e "s|@ROOT@|\$PWD/www|" -e "s|@DIR@|\$dir|g" -e "s|@USER@|\$user_line|" \\
  nginx.conf.in > "\$dir/nginx.conf"
exec $(command -v nginx) -p "\$dir" -c "\$dir/nginx.conf" -e "\$dir/error.log" -g "daemon off; pid \$dir/nginx.pid;"
EOF
cat > "$app_src/nginx.conf.in" <<'EOF'
# The app's nginx: one worker, no access log (the proxies log), answers kept alive.
@USER@
worker_processes 1;
error_log @DIR@/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path @DIR@/tmp/body;
  proxy_temp_path @DIR@/tmp/proxy;
  fastcgi_temp_path @DIR@/tmp/fastcgi;
  uwsgi_temp_path @DIR@/tmp/uwsgi;
  scgi_temp_path @DIR@/tmp/scgi;
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:@PORT@;
    location = /small { default_type text/plain; return 200 "hello\n"; }
    location = /1m { root @ROOT@; default_type application/octet-stream; }
  }
}
EOF
read -r bundle_sha bundle_size < <("$bin/examples/pack" "$app_src" "$work/bundle.tar") ||
  fail "cannot pack $app_src"

# ---- apprepo: stores the release ----------------------------------------------------------
repo_dir=$work/apprepo
mkdir -p "$repo_dir"
repo_port=$(free_port)
deploy_token=$("$bin/apprepo" token-new --name bench-deploy --role deploy 2> /dev/null)
read_token=$("$bin/apprepo" token-new --name bench-maestro --role read 2> /dev/null)
{
  printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\n' "$repo_port" "$repo_dir/data"
  printf '[[tokens]]\nname = "bench-deploy"\nrole = "deploy"\nsha256 = "%s"\n' \
    "$(printf '%s' "$deploy_token" | "$bin/apprepo" token-hash)"
  printf '[[tokens]]\nname = "bench-maestro"\nrole = "read"\nsha256 = "%s"\n' \
    "$(printf '%s' "$read_token" | "$bin/apprepo" token-hash)"
  # Plain HTTP on loopback: the download is not what is measured.
  printf '[api_tls]\nplain_http = true\n'
} > "$repo_dir/apprepo.toml"
PX_LOG=warn "$bin/apprepo" --config "$repo_dir/apprepo.toml" 2> "$repo_dir/stderr" &
pids+=("$!")
wait_port "$repo_port" || fail "apprepo did not start: $(tail -5 "$repo_dir/stderr")"
# repo_call WHAT OUT CURL_ARGS...: one call with the deploy token, its answer into OUT.
repo_call() {
  local what=$1 out=$2 code
  shift 2
  code=$(curl -s -o "$out" -w '%{http_code}' -H "Authorization: Bearer $deploy_token" "$@")
  [[ $code == 2* ]] || fail "apprepo answered $code to $what: $(head -c 500 "$out")"
}
repo_call "creating the app" "$repo_dir/answer" -H 'content-type: application/json' -d '{"name":"bench"}' \
  "http://127.0.0.1:$repo_port/v1/apps"
repo_call "the upload" "$repo_dir/answer" -H "x-px-bundle-sha256: $bundle_sha" -T "$work/bundle.tar" -X POST \
  "http://127.0.0.1:$repo_port/v1/apps/bench/releases"
repo_call "reading the release" "$repo_dir/release.json" \
  "http://127.0.0.1:$repo_port/v1/apps/bench/releases/current"

# ---- Maestro: the persisted assignment of that release --------------------------------------
mae_dir=$work/maestro-real
tls_dir=$mae_dir/certs
mkdir -p "$mae_dir/state" "$mae_dir/log" "$tls_dir"
# One certificate for both proxies' TLS listeners: ECDSA P-256, the key type ACME clients
# default to. `_default` is what Maestro serves when the client's SNI names nothing it has a
# certificate of its own for (wrk and h2load send none to 127.0.0.1), and it does not turn on
# the redirect to HTTPS, so the plain-HTTP rows stay plain.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
  -keyout "$tls_dir/_default.key" -out "$tls_dir/_default.crt" 2> "$mae_dir/openssl.log" ||
  fail "openssl could not make the certificate: $(cat "$mae_dir/openssl.log")"
python3 - "$repo_dir/release.json" "$bundle_sha" "$bundle_size" \
  "http://127.0.0.1:$repo_port/v1/bundles/$bundle_sha" "$host" > "$mae_dir/state/assignment.json" <<'EOF'
# What Beacon assigns for one app on one node (px_proto::link::AppAssignment), from apprepo's
# release record as Beacon reads it.
import json, sys
release_path, sha, size, url, host = sys.argv[1:]
release = json.load(open(release_path))
bundle = release["bundle"]
if bundle["sha256"] != sha or bundle["size"] != int(size):
    sys.exit(f"apprepo's release has bundle {bundle}, wanted {sha} of {size} bytes")
manifest = release["manifest"]
app = {
    "app": release["app"],
    "release": release["version"],
    "bundle_sha256": sha,
    "bundle_size": int(size),
    "bundle_url": url,
    "manifest": manifest,
    "env": {**manifest.get("env", {}), **release.get("config", {})},
    "instances": 1,
    "domains": [host],
    "app_created_at": release["created_at"],
}
if "unpacked_size" in bundle:
    app["bundle_unpacked_size"] = bundle["unpacked_size"]
json.dump({"generation": 1, "apps": [app]}, sys.stdout)
EOF
printf '%s\n' "$read_token" > "$mae_dir/read-token"
chmod 600 "$mae_dir/read-token"
mae_http_port=$(free_port)
mae_https_port=$(free_port)
mae_status_port=$(free_port)
cat > "$mae_dir/maestro.toml" <<EOF
node_name = "bench"
http_listen = "127.0.0.1:$mae_http_port"
https_listen = "127.0.0.1:$mae_https_port"
certs_dir = "$tls_dir"
status_listen = "127.0.0.1:$mae_status_port"
state_dir = "$mae_dir/state"
log_dir = "$mae_dir/log"
repository_token_file = "$mae_dir/read-token"
EOF
# Maestro's PATH reaches the app: nginx lives in /usr/sbin.
PX_LOG=warn PATH="$PATH:/usr/sbin" "$maestro_bin" --config "$mae_dir/maestro.toml" 2> "$mae_dir/stderr" &
mae_pid=$!
pids+=("$mae_pid")
# Maestro opens its proxy once the persisted app serves (or failed), so the port opening is not
# enough: the instance must be healthy, with its port, in /v1/state.
app_port=""
for _ in $(seq $((DEPLOY_WAIT_SECONDS * 10))); do
  kill -0 "$mae_pid" 2> /dev/null || fail "maestro exited: $(tail -20 "$mae_dir/stderr")"
  app_port=$(curl -s "http://127.0.0.1:$mae_status_port/v1/state" 2> /dev/null | python3 -c '
import json, sys
try:
    state = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
for i in state.get("instances", []):
    if i.get("app") == "bench" and i.get("state") == "healthy" and i.get("port"):
        print(i["port"])
        break
' || true)
  [[ -z $app_port ]] || break
  sleep 0.1
done
[[ -n $app_port ]] || fail "maestro did not serve the deployed app within ${DEPLOY_WAIT_SECONDS}s: $(tail -20 "$mae_dir/stderr")"
wait_port "$mae_http_port"
wait_port "$mae_https_port"

# server.py: the app's web server (Python standard library only), run by Maestro through app.toml.
"""Serves a greeting page on 127.0.0.1:$PORT and a health check; stops cleanly on SIGTERM.

Run it by hand with `python3 server.py 8000`; on Platform.X the port comes as $1 and $PORT.
"""

import html
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GREETING = os.environ.get("GREETING", "Hello from Platform.X")
APP = os.environ.get("PX_APP") or os.path.basename(os.getcwd())
RELEASE = os.environ.get("PX_RELEASE", "dev")
# Where Maestro takes this instance's events and heartbeats (unset outside Platform.X).
EVENTS_URL = os.environ.get("PX_EVENTS_URL")
HEARTBEAT_SECONDS = float(os.environ.get("PX_HEARTBEAT_INTERVAL") or 0)

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{app}</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<main>
<h1>{greeting}</h1>
<p>This is <strong>{app}</strong>, release <code>{release}</code>, served by Python.</p>
<p>The stylesheet comes from <code>public/</code>, served by Maestro without reaching this process.</p>
</main>
</body>
</html>
"""


def log(line):
    """One line per event on stdout; Maestro timestamps it and `em logs` shows it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def post_event(body):
    """POSTs one JSON body to Maestro's events endpoint. Best effort: never fails the app."""
    if not EVENTS_URL:
        return
    request = urllib.request.Request(
        EVENTS_URL,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=2).close()
    except OSError as e:
        sys.stderr.write(f"cannot report to maestro: {e}\n")


def report(level, message, **fields):
    """An event for `em logs` and Beacon's status page; "error" and "critical" alert the
    sysadmins. level is "info", "warning", "error" or "critical"."""
    post_event({"level": level, "message": message, "fields": fields})


class Server(ThreadingHTTPServer):
    """Sends heartbeats from the serving loop itself, so a wedged loop stops them and Maestro
    restarts the instance (after three missed intervals)."""

    daemon_threads = True
    next_heartbeat = 0.0

    def service_actions(self):
        # Called by serve_forever() between requests, about twice a second.
        if HEARTBEAT_SECONDS > 0 and time.monotonic() >= self.next_heartbeat:
            self.next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
            post_event({"heartbeat": True})


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open between requests; every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "platformx-python"
    # The head and the body go out in two writes; without this, each keep-alive answer waits
    # for the client's delayed acknowledgement (about 40 ms).
    disable_nagle_algorithm = True

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            body = PAGE.format(
                app=html.escape(APP),
                greeting=html.escape(GREETING),
                release=html.escape(RELEASE),
            )
            self.reply(200, "text/html; charset=utf-8", body)
        elif path == "/healthz":
            self.reply(200, "text/plain; charset=utf-8", "ok\n")
        else:
            self.reply(404, "text/plain; charset=utf-8", "not found\n")

    def do_HEAD(self):
        self.do_GET()

    def reply(self, status, content_type, text):
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        log(f"{self.command} {self.path} {code}")

    def log_message(self, format, *args):
        sys.stderr.write(format % args + "\n")
        sys.stderr.flush()


def main():
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8000"))
    server = Server(("127.0.0.1", port), Handler)

    def stop(signum, _frame):
        log(f"got {signal.Signals(signum).name}, stopping")
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"{APP} release {RELEASE} listening on http://127.0.0.1:{port}")
    report("info", "started", release=RELEASE)
    server.serve_forever()
    server.server_close()
    log("stopped")


if __name__ == "__main__":
    main()

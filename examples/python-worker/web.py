# web.py: the web process (the Procfile's `web:` line): takes jobs and says how the queue is.
"""POST /jobs enqueues a job (the body is its payload) and answers its id; GET /jobs/<id> says
whether it is done; GET /stats counts the jobs in each state; GET /healthz answers ok.
"""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jobqueue as jobs

# Largest payload taken: a job names work, it does not carry files.
MAX_PAYLOAD = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.answer(200, "ok")
        if self.path in ("/", "/stats"):
            return self.answer(200, jobs.counts())
        if self.path.startswith("/jobs/"):
            job = self.path[len("/jobs/"):]
            if not job.isalnum():
                return self.answer(400, {"error": "a job id is letters and digits"})
            done = os.path.exists(os.path.join(jobs.DONE, job + ".json"))
            return self.answer(200, {"id": job, "done": done})
        self.answer(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/jobs":
            return self.answer(404, {"error": "not found"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_PAYLOAD:
            return self.answer(413, {"error": f"a payload is at most {MAX_PAYLOAD} bytes"})
        payload = self.rfile.read(length).decode("utf-8", "replace")
        self.answer(201, {"id": jobs.enqueue(payload)})

    def log_message(self, *args):
        pass


jobs.ensure_dirs()
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
# SIGTERM ends serve_forever (a request in hand is answered first by its own thread).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"web of v{os.environ.get('PX_RELEASE', 'dev')} on port {sys.argv[1]}", flush=True)
server.serve_forever()

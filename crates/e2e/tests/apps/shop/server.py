"""The shop page, a health check, and a WebSocket echo at /ws, with the standard library alone."""

import base64
import hashlib
import http.server
import os
import struct

PAGE = b"""<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>shop</title>
<link rel="stylesheet" href="/assets/style.css">
<script src="/assets/app.js" defer></script>
</head>
<body>
<h1 id="title">shop</h1>
<img id="logo" src="/assets/logo.svg" alt="logo">
<p id="script">the script has not run</p>
<p id="socket">no WebSocket yet</p>
</body>
</html>
"""

# RFC 6455's fixed key suffix for Sec-WebSocket-Accept.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The longest frame the echo reads: the page sends one short text.
MAX_FRAME = 4096
OPCODE_TEXT = 0x1
OPCODE_CLOSE = 0x8


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.echo()
            return
        if self.path == "/":
            self.answer(PAGE, "text/html; charset=utf-8")
        elif self.path == "/healthz":
            self.answer(b"ok", "text/plain")
        else:
            self.send_error(404)

    def answer(self, body, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def echo(self):
        """Answers the upgrade, then echoes each text frame back as "echo: <text>" until close."""
        self.close_connection = True
        key = self.headers.get("Sec-WebSocket-Key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127 or length > MAX_FRAME:
                return
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == OPCODE_CLOSE:
                self.frame(OPCODE_CLOSE, payload[:2])
                return
            if opcode == OPCODE_TEXT:
                self.frame(OPCODE_TEXT, b"echo: " + payload)

    def frame(self, opcode, payload):
        # A server's frames are unmasked; every payload here is under 126 bytes.
        self.wfile.write(bytes([0x80 | opcode, len(payload)]) + payload)
        self.wfile.flush()

    def log_message(self, *args):
        pass


# Threads: the WebSocket stays open while the page's other requests are answered.
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()

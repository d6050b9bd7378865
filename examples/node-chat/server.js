// server.js: the chat server (Node.js built-ins only), run by Maestro through app.toml.
//
// GET  /                   the chat page
// POST /messages           {"text": "..."} adds a message (body at most 4 KiB)
// GET  /messages?after=N   messages newer than N; waits up to 25 s for one (long polling)
// GET  /healthz            200 "ok"
//
// It reports events to Maestro (`report`: shown by `em logs` and on Beacon's status page;
// "error" and above alert the sysadmins) and sends heartbeats from its event loop, so a
// wedged loop gets the instance restarted. Both are plain HTTP POSTs to $PX_EVENTS_URL.
//
// Messages live in memory (the last 100), so each release starts an empty room. On SIGTERM
// the server stops accepting, answers waiting polls with 503 and Retry-After so browsers
// reconnect (to the new release, once Maestro has switched), and exits.
'use strict';

const http = require('node:http');
const path = require('node:path');

const PORT = Number(process.env.PORT || process.argv[2] || 8000);
const APP = process.env.PX_APP || path.basename(process.cwd());
const RELEASE = process.env.PX_RELEASE || 'dev';
const MAX_BODY_BYTES = 4 * 1024;
const MAX_MESSAGES = 100;
const MAX_TEXT_CHARS = 1000;
const POLL_WAIT_MS = 25 * 1000;
const FORCE_EXIT_MS = 10 * 1000;
const EVENTS_URL = process.env.PX_EVENTS_URL;
const HEARTBEAT_SECONDS = Number(process.env.PX_HEARTBEAT_INTERVAL || 0);

const messages = []; // {id, text, at}, oldest first
let lastId = 0;
const waiting = new Set(); // pending long polls: {res, after, timer}
let stopping = false;

function log(line) {
  process.stdout.write(line + '\n');
}

// POSTs one JSON body to Maestro's events endpoint. Best effort: the app never fails for it.
function postEvent(body) {
  if (!EVENTS_URL) return;
  const data = JSON.stringify(body);
  const req = http.request(EVENTS_URL, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) },
    timeout: 2000,
  });
  req.on('response', (res) => res.resume());
  req.on('timeout', () => req.destroy());
  req.on('error', (e) => process.stderr.write(`cannot report to maestro: ${e.message}\n`));
  req.end(data);
}

// An event: level is "info", "warning", "error" or "critical"; fields are optional key/values.
function report(level, message, fields = {}) {
  postEvent({ level, message, fields });
}

function send(res, status, contentType, body, headers = {}) {
  const bytes = Buffer.from(body);
  res.writeHead(status, {
    'Content-Type': contentType,
    'Content-Length': bytes.length,
    'Cache-Control': 'no-store',
    ...(stopping ? { Connection: 'close' } : {}),
    ...headers,
  });
  res.end(bytes);
}

function sendJson(res, status, value, headers) {
  send(res, status, 'application/json', JSON.stringify(value), headers);
}

function newerThan(after) {
  // A client that has seen more than this process knows came from an older release.
  const from = after > lastId ? 0 : after;
  return messages.filter((m) => m.id > from);
}

function answerPoll(poll) {
  clearTimeout(poll.timer);
  waiting.delete(poll);
  sendJson(poll.res, 200, { messages: newerThan(poll.after), last: lastId });
}

function addMessage(text) {
  const message = { id: ++lastId, text, at: new Date().toISOString() };
  messages.push(message);
  if (messages.length > MAX_MESSAGES) messages.shift();
  for (const poll of [...waiting]) answerPoll(poll);
  return message;
}

function getMessages(req, res, url) {
  const raw = url.searchParams.get('after') ?? '0';
  const after = Number(raw);
  if (!Number.isSafeInteger(after) || after < 0) {
    sendJson(res, 400, { error: `after=${raw} must be a message number such as 0` });
    return;
  }
  if (newerThan(after).length > 0 || stopping) {
    sendJson(res, 200, { messages: newerThan(after), last: lastId });
    return;
  }
  const poll = { res, after, timer: null };
  poll.timer = setTimeout(() => answerPoll(poll), POLL_WAIT_MS);
  waiting.add(poll);
  // The browser went away: forget the poll.
  res.on('close', () => {
    clearTimeout(poll.timer);
    waiting.delete(poll);
  });
}

function postMessage(req, res) {
  const declared = Number(req.headers['content-length'] || 0);
  if (declared > MAX_BODY_BYTES) {
    tooLarge(req, res);
    return;
  }
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      tooLarge(req, res);
      return;
    }
    chunks.push(chunk);
  });
  req.on('end', () => {
    if (res.headersSent) return;
    let text;
    try {
      text = JSON.parse(Buffer.concat(chunks).toString('utf8')).text;
    } catch {
      text = undefined;
    }
    if (typeof text !== 'string' || text.trim() === '') {
      sendJson(res, 400, { error: 'send JSON like {"text": "hello"}' });
      return;
    }
    sendJson(res, 201, addMessage(text.trim().slice(0, MAX_TEXT_CHARS)));
  });
}

function tooLarge(req, res) {
  if (res.headersSent) return;
  // Do not read the rest of an oversized body: answer, then close the connection.
  sendJson(res, 413, { error: `messages are limited to ${MAX_BODY_BYTES} bytes; send a shorter one` }, {
    Connection: 'close',
  });
  req.pause();
  res.on('finish', () => req.socket.destroy());
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  res.on('finish', () => log(`${req.method} ${req.url} ${res.statusCode}`));
  if (url.pathname === '/' && req.method === 'GET') {
    send(res, 200, 'text/html; charset=utf-8', page());
  } else if (url.pathname === '/healthz' && req.method === 'GET') {
    send(res, 200, 'text/plain; charset=utf-8', 'ok\n');
  } else if (url.pathname === '/messages' && req.method === 'GET') {
    getMessages(req, res, url);
  } else if (url.pathname === '/messages' && req.method === 'POST') {
    postMessage(req, res);
  } else if (url.pathname === '/' || url.pathname === '/healthz' || url.pathname === '/messages') {
    send(res, 405, 'text/plain; charset=utf-8', 'method not allowed\n');
  } else {
    send(res, 404, 'text/plain; charset=utf-8', 'not found\n');
  }
});

function stop(signal) {
  if (stopping) return;
  stopping = true;
  log(`got ${signal}, stopping`);
  // No new connections; the callback runs once every open one has ended.
  server.close(() => {
    log('stopped');
    process.exit(0);
  });
  for (const poll of [...waiting]) {
    clearTimeout(poll.timer);
    waiting.delete(poll);
    sendJson(poll.res, 503, { error: 'this server is stopping; poll again' }, { 'Retry-After': '1' });
  }
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), FORCE_EXIT_MS).unref();
}

process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));

server.listen(PORT, '127.0.0.1', () => {
  log(`${APP} release ${RELEASE} listening on http://127.0.0.1:${PORT}`);
  report('info', 'chat room open', { release: RELEASE });
  if (HEARTBEAT_SECONDS > 0) {
    // Runs on the event loop: if the loop wedges, heartbeats stop and Maestro restarts us.
    postEvent({ heartbeat: true });
    setInterval(() => postEvent({ heartbeat: true }), HEARTBEAT_SECONDS * 1000).unref();
  }
});

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page() {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(APP)}</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<main>
<h1>${escapeHtml(APP)}</h1>
<p class="meta">release <code>${escapeHtml(RELEASE)}</code> &middot; <span id="status">connecting</span></p>
<ul id="messages"></ul>
<form id="form">
<input id="text" autocomplete="off" maxlength="${MAX_TEXT_CHARS}" placeholder="Say something" required>
<button>Send</button>
</form>
</main>
<script>
const list = document.getElementById('messages');
const status = document.getElementById('status');
let last = 0;

function show(message) {
  const item = document.createElement('li');
  const time = document.createElement('time');
  time.textContent = new Date(message.at).toLocaleTimeString();
  item.append(time, ' ', message.text);
  list.append(item);
  item.scrollIntoView({ block: 'end' });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function poll() {
  for (;;) {
    try {
      const response = await fetch('/messages?after=' + last);
      if (response.status === 503) {
        status.textContent = 'reconnecting';
        await sleep(1000 * Number(response.headers.get('Retry-After') || 1));
        continue;
      }
      const body = await response.json();
      body.messages.forEach(show);
      last = body.last;
      status.textContent = 'connected';
    } catch {
      status.textContent = 'offline, retrying';
      await sleep(2000);
    }
  }
}

document.getElementById('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = document.getElementById('text');
  const response = await fetch('/messages', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ text: input.value }),
  });
  if (response.ok) input.value = '';
});

poll();
</script>
</body>
</html>
`;
}

// An Express app: a page, a stylesheet from public/, and a health check for Maestro.
const path = require("path");
const express = require("express");

const app = express();
const port = Number(process.env.PORT || 3000);
const release = process.env.PX_RELEASE || "?";

app.use(express.static(path.join(__dirname, "public")));

app.get("/", (req, res) => {
  res.type("html").send(`<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Hello from Express on Platform.X</title>
  <link rel="stylesheet" href="/style.css">
</head>
<body>
  <h1>Hello from Express</h1>
  <p>Built by the platform from package-lock.json; release <code>${release}</code>, Node ${process.version}.</p>
</body>
</html>
`);
});

app.get("/healthz", (req, res) => res.type("text").send("ok\n"));

const server = app.listen(port, "127.0.0.1", () => {
  console.log(`express-hello v${release} listening on 127.0.0.1:${port}`);
});

// Maestro stops an instance with SIGTERM: finish what is in flight, then exit.
process.on("SIGTERM", () => server.close(() => process.exit(0)));

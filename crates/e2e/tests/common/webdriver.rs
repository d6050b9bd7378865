//! A small WebDriver client (the W3C protocol, JSON over HTTP) for ChromeDriver on loopback:
//! a headless Chromium session, navigation, and scripts run in the page.
#![allow(dead_code)]

use std::time::Duration;

use px_test_support::browser::ChromeDriver;
use serde_json::{Value, json};

/// How long one WebDriver command may take: a new session launches Chromium, a navigation
/// waits for the page's load event.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// How long a page load, or an asynchronous script, may take inside the browser.
const PAGE_LIMIT: Duration = Duration::from_secs(60);

/// One Chromium session, deleted (Chromium closed) by [`Session::close`]; ChromeDriver's drop
/// ends it too.
pub struct Session<'a> {
    driver: &'a ChromeDriver,
    http: reqwest::Client,
    base: String,
}

impl<'a> Session<'a> {
    /// Opens a headless session whose name lookups follow `host_rules` (Chromium's
    /// `--host-resolver-rules`, e.g. `MAP shop.example.com 127.0.0.1`).
    pub async fn start(driver: &'a ChromeDriver, host_rules: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(COMMAND_LIMIT)
            .build()
            .unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // DevTools' network events, read back by `websocket_handshakes`.
            "goog:loggingPrefs": {"performance": "ALL"},
            "goog:chromeOptions": {
                "binary": driver.chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root, where Chromium's sandbox refuses to start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--host-resolver-rules={host_rules}"),
                ],
            },
        }}});
        let started = command(
            &http,
            driver,
            "POST",
            &format!("{}/session", driver.url()),
            capabilities,
        )
        .await
        .unwrap_or_else(|e| panic!("no browser session: {e}\nchromedriver: {}", driver.log()));
        let id = started["sessionId"].as_str().unwrap().to_string();
        let session = Self {
            driver,
            http,
            base: format!("{}/session/{id}", driver.url()),
        };
        let limit = u64::try_from(PAGE_LIMIT.as_millis()).unwrap();
        session
            .call(
                "POST",
                "/timeouts",
                json!({"pageLoad": limit, "script": limit}),
            )
            .await
            .unwrap();
        session
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        command(
            &self.http,
            self.driver,
            method,
            &format!("{}{path}", self.base),
            body,
        )
        .await
    }

    /// Navigates to `url` and waits for its load event. A page that cannot load (a certificate
    /// Chromium refuses) still navigates: to Chromium's error page.
    pub async fn goto(&self, url: &str) -> Result<(), String> {
        self.call("POST", "/url", json!({ "url": url }))
            .await
            .map(|_| ())
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Runs `script` in the page; it finishes by calling `arguments[arguments.length - 1]`
    /// with its value, within [`PAGE_LIMIT`].
    pub async fn run_async(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/async",
            json!({"script": script, "args": []}),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// The text the page shows.
    pub async fn text(&self) -> String {
        self.run("return document.body ? document.body.innerText : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Every WebSocket handshake the browser's network log holds since the last read: the
    /// socket's URL and the status its handshake was answered with (101 for an HTTP/1.1
    /// upgrade), as DevTools' Network panel shows them.
    pub async fn websocket_handshakes(&self) -> Vec<(String, u64)> {
        let entries = self
            .call("POST", "/se/log", json!({"type": "performance"}))
            .await
            .unwrap();
        let events: Vec<Value> = entries
            .as_array()
            .unwrap()
            .iter()
            .map(|e| serde_json::from_str::<Value>(e["message"].as_str().unwrap()).unwrap())
            .map(|m| m["message"].clone())
            .collect();
        let url_of = |id: &Value| {
            events
                .iter()
                .find(|e| {
                    e["method"] == "Network.webSocketCreated" && &e["params"]["requestId"] == id
                })
                .and_then(|e| e["params"]["url"].as_str())
                .unwrap_or("(unknown)")
                .to_string()
        };
        events
            .iter()
            .filter(|e| e["method"] == "Network.webSocketHandshakeResponseReceived")
            .map(|e| {
                let params = &e["params"];
                (
                    url_of(&params["requestId"]),
                    params["response"]["status"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    pub async fn close(self) {
        self.call("DELETE", "", Value::Null).await.unwrap();
    }
}

/// One WebDriver command: its `value`, or the error WebDriver answered with.
async fn command(
    http: &reqwest::Client,
    driver: &ChromeDriver,
    method: &str,
    url: &str,
    body: Value,
) -> Result<Value, String> {
    let request = match method {
        "GET" => http.get(url),
        "DELETE" => http.delete(url),
        _ => http.post(url).json(&body),
    };
    let response = request
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}; chromedriver: {}", driver.log()))?;
    let status = response.status();
    let mut answer: Value = response
        .json()
        .await
        .map_err(|e| format!("{method} {url}: {status} with no JSON: {e}"))?;
    let value = answer["value"].take();
    if status.is_success() {
        Ok(value)
    } else {
        Err(format!(
            "{method} {url}: {status} {}: {}",
            value["error"], value["message"]
        ))
    }
}

//! A real browser (headless Chromium, driven through ChromeDriver) loads an app over HTTPS
//! under the certificate Beacon ordered from a real ACME server (Pebble) for the app's domain:
//! the page over HTTP/2, its stylesheet, script and image as Maestro serves them, and a
//! WebSocket through the proxy (an HTTP/1.1 upgrade, answered 101, echoing over `wss://`). The browser trusts Pebble's root alone, and refuses the same
//! name under a certificate from another CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::acme_stack::*;
use common::webdriver::Session;
use px_beacon::config::ChallengeKind;
use px_test_support::browser::ChromeDriver;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The app under `tests/apps/shop`: its `app.toml` names [`DOMAIN`].
fn shop_app() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/shop")
}

/// The static files the page loads, as Maestro serves them from the app's `public/`.
const STATIC_FILES: [&str; 3] = ["/assets/style.css", "/assets/app.js", "/assets/logo.svg"];
/// What the page's script sends over the WebSocket, and what the app echoes back.
const ECHO: &str = "echo: ping from the page";
/// The colour `style.css` gives the title, as the browser computes it.
const TITLE_COLOUR: &str = "rgb(0, 128, 128)";
/// `logo.svg`'s width, which the browser knows only once it has loaded the image.
const LOGO_WIDTH: u64 = 24;

/// Whether the app's page, not an error page, is shown.
const TITLE_SHOWN: &str = r#"return document.getElementById("title") !== null"#;

/// What the page saw, read in the page once its WebSocket settled: the navigation's and each
/// resource's protocol (Resource Timing's `nextHopProtocol`) and status, the script's mark, the
/// socket's state, the stylesheet's effect and the image's size.
const REPORT: &str = r#"
const done = arguments[arguments.length - 1];
const settled = () => document.readyState === "complete" && window.shopSocket
  && !["connecting", "open"].includes(window.shopSocket.state);
const report = () => {
  const navigation = performance.getEntriesByType("navigation")[0];
  done({
    url: location.href,
    navigation: { protocol: navigation.nextHopProtocol, status: navigation.responseStatus },
    resources: performance.getEntriesByType("resource").map((r) => ({
      path: new URL(r.name).pathname, protocol: r.nextHopProtocol, status: r.responseStatus,
    })),
    script: document.getElementById("script").textContent,
    socket: window.shopSocket,
    title_colour: getComputedStyle(document.getElementById("title")).color,
    logo_width: document.getElementById("logo").naturalWidth,
  });
};
(function wait() { if (settled()) report(); else setTimeout(wait, 50); })();
"#;

/// A TLS server for [`DOMAIN`] under a certificate from a CA of the test's own, not Pebble's:
/// a browser that trusts Pebble alone must refuse it.
async fn impostor(stop: CancellationToken) -> u16 {
    let pki = px_test_support::Pki::new(&[DOMAIN]).unwrap();
    let tls = px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _pki = pki;
        loop {
            let tcp = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap().0,
            };
            // The browser aborts the handshake once it sees the certificate.
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_loads_an_app_over_https_and_http2_under_an_acme_certificate_with_its_static_files_and_a_websocket()
 {
    let Some(stack) = Stack::start(ChallengeKind::Http01, true).await else {
        return;
    };
    stack.deploy_app("shop", &shop_app()).await;
    stack
        .wait_https_holding("/", "<h1 id=\"title\">shop</h1>")
        .await;
    let root = stack.pebble_root().await;
    let Some(driver) = ChromeDriver::start(&[&root]) else {
        stack.stop().await;
        return;
    };
    // Every name the browser looks up goes to this machine, as Pebble's DNS answers it; the
    // URL's port picks the proxy's HTTPS listener.
    let browser = Session::start(&driver, "MAP * 127.0.0.1").await;

    let page = format!("https://{DOMAIN}:{}/", stack.https_port);
    browser.goto(&page).await.unwrap();
    // Chromium's own error page (a certificate it refused) has no title of the app's.
    if browser.run(TITLE_SHOWN).await != true {
        panic!("the page did not load: {}", browser.text().await);
    }
    let seen: Value = browser.run_async(REPORT).await;
    println!(
        "the browser saw, at {page}:\n{}",
        serde_json::to_string_pretty(&seen).unwrap()
    );
    assert_eq!(seen["url"], page.as_str(), "{seen:#}");
    assert_eq!(seen["navigation"]["protocol"], "h2", "{seen:#}");
    assert_eq!(seen["navigation"]["status"], 200, "{seen:#}");
    assert_eq!(seen["script"], "the script ran", "{seen:#}");
    for path in STATIC_FILES {
        let entry = seen["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("the page never loaded {path}: {seen:#}"));
        assert_eq!(entry["protocol"], "h2", "{path}: {seen:#}");
        assert_eq!(entry["status"], 200, "{path}: {seen:#}");
    }
    assert_eq!(seen["title_colour"], TITLE_COLOUR, "{seen:#}");
    assert_eq!(seen["logo_width"], LOGO_WIDTH, "{seen:#}");
    assert_eq!(
        seen["socket"],
        serde_json::json!({"state": "echoed", "echo": ECHO}),
        "the WebSocket over wss:// did not echo: {seen:#}"
    );
    assert!(browser.text().await.contains(ECHO));
    // The browser's own record of the socket: an upgrade answered 101 Switching Protocols,
    // through the proxy to the app.
    let handshakes = browser.websocket_handshakes().await;
    println!("WebSocket handshakes: {handshakes:?}");
    assert_eq!(
        handshakes,
        [(format!("wss://{DOMAIN}:{}/ws", stack.https_port), 101)]
    );

    // The same browser, the same name, a certificate Pebble did not issue: Chromium shows its
    // certificate error page, and nothing of the page runs.
    let stop = CancellationToken::new();
    let impostor_page = format!("https://{DOMAIN}:{}/", impostor(stop.clone()).await);
    browser.goto(&impostor_page).await.unwrap();
    let refused = browser.text().await;
    println!("the browser showed, at {impostor_page}:\n{refused}");
    assert!(
        refused.contains("ERR_CERT_AUTHORITY_INVALID"),
        "a certificate from another CA was not refused: {refused}"
    );
    assert!(!refused.contains("the script ran"), "{refused}");
    stop.cancel();

    browser.close().await;
    drop(driver);
    stack.stop().await;
}

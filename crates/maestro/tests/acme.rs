//! The proxy's part in ACME: it answers the HTTP-01 challenges Beacon sends for any host,
//! before routing and before the redirect to HTTPS, and serves ACME's certificates by SNI
//! beside `certs_dir`'s, an operator's file for the same name winning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common_proxy;

use std::sync::Arc;

use common_proxy::{route, table};
use px_maestro::internals::{AccessLog, CertStore, Proxy, ProxyMetrics, ProxySettings, Routes};
use px_proto::acme::AcmeChallenges;
use px_test_support::Pki;
use tokio_util::sync::CancellationToken;

fn proxy(https_redirect: bool) -> Arc<Proxy> {
    let routes = Arc::new(Routes::default());
    routes.store(table(&[(
        "shop.example.com",
        route("shop", vec![], vec![]),
    )]));
    Proxy::new(
        routes,
        ProxySettings {
            workers: 1,
            https_redirect,
            ..Default::default()
        },
        Arc::new(ProxyMetrics::default()),
        AccessLog::disabled(),
    )
}

#[tokio::test]
async fn http_01_tokens_are_answered_for_any_host_before_the_https_redirect() {
    let proxy = proxy(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    tokio::spawn(proxy.clone().serve_http(listener, shutdown.clone()));
    let mut set = AcmeChallenges::default();
    set.http01.insert("tok-1".into(), "tok-1.thumbprint".into());
    proxy.acme().set_challenges(&set);
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("shop.example.com", addr)
        .resolve("new.example.com", addr)
        .build()
        .unwrap();
    let url = |host: &str, path: &str| format!("http://{host}:{}{path}", addr.port());
    // Hosts no app serves yet (the CA validates a name before it routes) answer, whatever the
    // operator's redirect; `proxy_h2.rs` shows a routed host's redirect leaves the path alone.
    for host in ["shop.example.com", "new.example.com"] {
        let r = client
            .get(url(host, "/.well-known/acme-challenge/tok-1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
        assert_eq!(r.text().await.unwrap(), "tok-1.thumbprint");
    }
    // A token Beacon did not send gets what any request to a host no app serves gets (never a
    // redirect: the challenge path is not redirected), and so does a token once Beacon's next
    // set no longer holds it.
    let r = client
        .get(url("shop.example.com", "/.well-known/acme-challenge/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_ne!(r.text().await.unwrap(), "tok-1.thumbprint");
    proxy.acme().set_challenges(&AcmeChallenges::default());
    let r = client
        .get(url("shop.example.com", "/.well-known/acme-challenge/tok-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

fn tls_client(ca: &Pki, addr: std::net::SocketAddr) -> reqwest::Client {
    let pem = std::fs::read(ca.ca()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("shop.example.com", addr)
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_acme_certificate_serves_its_name_and_an_operators_file_wins() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = CertStore::load(certs_dir.path()).unwrap();
    let proxy = proxy(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    tokio::spawn(
        proxy
            .clone()
            .serve_https(listener, certs.clone(), shutdown.clone()),
    );
    let url = format!("https://shop.example.com:{}/", addr.port());

    // Nothing for the name yet: no handshake.
    let acme_ca = Pki::new(&["shop.example.com"]).unwrap();
    assert!(tls_client(&acme_ca, addr).get(&url).send().await.is_err());

    // ACME's certificate serves it (the app has no instance: the proxy's own 502 page).
    proxy
        .acme()
        .set_issued(
            "shop.example.com",
            &std::fs::read_to_string(acme_ca.cert()).unwrap(),
            &std::fs::read_to_string(acme_ca.key()).unwrap(),
        )
        .unwrap();
    let r = tls_client(&acme_ca, addr).get(&url).send().await.unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());

    // The operator's own file for the name wins once it is loaded.
    let operator_ca = Pki::new(&["shop.example.com"]).unwrap();
    std::fs::copy(
        operator_ca.cert(),
        certs_dir.path().join("shop.example.com.crt"),
    )
    .unwrap();
    std::fs::copy(
        operator_ca.key(),
        certs_dir.path().join("shop.example.com.key"),
    )
    .unwrap();
    certs.reload().unwrap();
    assert!(
        tls_client(&operator_ca, addr)
            .get(&url)
            .send()
            .await
            .is_ok()
    );
    assert!(tls_client(&acme_ca, addr).get(&url).send().await.is_err());
}

/// A TLS handshake with `shop.example.com` offering `alpn` alone, trusting `ca`; the leaf the
/// server presented, or the handshake's error.
async fn handshake(
    addr: std::net::SocketAddr,
    ca: &Pki,
    alpn: &[u8],
) -> Result<Vec<u8>, std::io::Error> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca.ca()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("shop.example.com").unwrap();
    let tls = connector.connect(name, tcp).await?;
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test]
async fn a_client_asking_only_for_acme_tls_gets_the_tls_alpn_01_certificate() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = CertStore::load(certs_dir.path()).unwrap();
    let proxy = proxy(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    tokio::spawn(
        proxy
            .clone()
            .serve_https(listener, certs.clone(), shutdown.clone()),
    );
    let challenge = Pki::new(&["shop.example.com"]).unwrap();
    let mut set = AcmeChallenges::default();
    set.tls_alpn01.insert(
        "shop.example.com".into(),
        px_proto::acme::ChallengeCert {
            cert_pem: std::fs::read_to_string(challenge.cert()).unwrap(),
            key_pem: std::fs::read_to_string(challenge.key()).unwrap(),
        },
    );
    proxy.acme().set_challenges(&set);
    let served = handshake(addr, &challenge, b"acme-tls/1").await.unwrap();
    let expected = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_file(challenge.cert()).unwrap()
    };
    assert_eq!(served, expected.to_vec());
    // An ordinary client never sees it: there is no certificate for the name otherwise.
    assert!(handshake(addr, &challenge, b"http/1.1").await.is_err());
}

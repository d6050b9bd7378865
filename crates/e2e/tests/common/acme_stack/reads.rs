//! What the ACME stack's tests read: HTTPS clients that trust Pebble's root, waits for an
//! answer under Pebble's certificate, and the certificates, events and alerts the services
//! keep.

use std::time::{Duration, Instant};

use px_proto::acme::{AcmeCert, AcmeCertSummary};
use px_proto::beacon::{Event, EventKind};

use super::{DOMAIN, Stack, WAIT};

impl Stack {
    /// A client that trusts Pebble's root alone and finds [`DOMAIN`] on the proxy's port.
    pub async fn pebble_client(&self) -> reqwest::Client {
        self.pebble_client_for(DOMAIN, self.https_port).await
    }

    /// A client that trusts Pebble's root alone, finds `domain` on 127.0.0.1:`port` and
    /// keeps the server's certificate of each response ([`served_leaf`]).
    pub async fn pebble_client_for(&self, domain: &str, port: u16) -> reqwest::Client {
        let root = self.pebble_root().await;
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&root).unwrap())
            .resolve(domain, ([127, 0, 0, 1], port).into())
            .tls_info(true)
            .build()
            .unwrap()
    }

    /// Waits until `https://domain/` on 127.0.0.1:`port` answers `body` under a certificate
    /// Pebble issued; returns the leaf certificate it was served under (DER).
    pub async fn wait_https_at(&self, domain: &str, port: u16, body: &str) -> Vec<u8> {
        let url = format!("https://{domain}:{port}/");
        let start = Instant::now();
        loop {
            let client = self.pebble_client_for(domain, port).await;
            let last = match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => {
                    let leaf = served_leaf(&r);
                    let text = r.text().await.unwrap();
                    if text == body {
                        return leaf;
                    }
                    format!("answered {text:?}")
                }
                Ok(r) => format!("status {}", r.status()),
                Err(e) => format!("{e:?}"),
            };
            assert!(
                start.elapsed() < WAIT,
                "{url} never answered {body:?} under Pebble's certificate; last: {last}; certificates: {:?}",
                self.certs().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The alerts received so far whose text contains `needle`.
    pub fn alerts_with(&self, needle: &str) -> Vec<serde_json::Value> {
        self.alerts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a["text"].as_str().is_some_and(|t| t.contains(needle)))
            .cloned()
            .collect()
    }

    /// Waits until `https://DOMAIN/` answers `body` under a certificate Pebble issued.
    pub async fn wait_https(&self, body: &str) {
        self.wait_https_until("/", &format!("{body:?}"), |text| text == body)
            .await;
    }

    /// Pebble's root (PEM): the CA every certificate it issues chains to.
    pub async fn pebble_root(&self) -> Vec<u8> {
        let listener_ca =
            reqwest::Certificate::from_pem(&std::fs::read(self.pebble.listener_pki.ca()).unwrap())
                .unwrap();
        let management = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(listener_ca)
            .build()
            .unwrap();
        let r = management.get(self.pebble.root_url()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap().to_vec()
    }

    /// Waits until `https://DOMAIN{path}` answers 200 with a body holding `needle`, under a
    /// certificate Pebble issued.
    pub async fn wait_https_holding(&self, path: &str, needle: &str) {
        self.wait_https_until(path, &format!("with {needle:?}"), |text| {
            text.contains(needle)
        })
        .await;
    }

    /// Waits until `https://DOMAIN{path}` answers 200 with a body `wanted` accepts, under a
    /// certificate Pebble issued; `what` says what was awaited when it never comes.
    async fn wait_https_until(&self, path: &str, what: &str, wanted: impl Fn(&str) -> bool) {
        let url = format!("https://{DOMAIN}:{}{path}", self.https_port);
        let start = Instant::now();
        loop {
            // Pebble's root, read again each time: it exists once Pebble runs.
            let client = self.pebble_client().await;
            let last = match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => {
                    let text = r.text().await.unwrap();
                    if wanted(&text) {
                        return;
                    }
                    format!("answered {text:?}")
                }
                Ok(r) => format!("status {}", r.status()),
                Err(e) => format!("{e:?}"),
            };
            assert!(
                start.elapsed() < WAIT,
                "{url} never answered {what} under Pebble's certificate; last: {last}; certificates: {:?}",
                self.certs().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `GET url` with the deploy token, its JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, url: String) -> T {
        self.http
            .get(url)
            .bearer_auth(&self.deploy)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /v1/acme/certs`, as `em domains list` reads it.
    pub async fn certs(&self) -> Vec<AcmeCertSummary> {
        self.get_json(format!("{}/v1/acme/certs", self.repo_url))
            .await
    }

    pub async fn stored(&self) -> AcmeCert {
        self.http
            .get(format!("{}/v1/acme/certs/{DOMAIN}", self.repo_url))
            .bearer_auth(&self.beacon_repo_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The leaf certificate of the record apprepo keeps for [`DOMAIN`] (DER).
    pub async fn stored_leaf(&self) -> (AcmeCert, Vec<u8>) {
        let stored = self.stored().await;
        let leaf = leaf_of(&stored.chain_pem);
        (stored, leaf)
    }

    pub async fn events(&self, kind: EventKind) -> Vec<Event> {
        let events: Vec<Event> = match self
            .http
            .get(format!("{}/v1/events?limit=1000", self.beacon_url))
            .bearer_auth(&self.deploy)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => r.json().await.unwrap(),
            _ => Vec::new(),
        };
        events.into_iter().filter(|e| e.kind == kind).collect()
    }
}

/// The certificate a response was served under (DER); the client keeps it with `tls_info`.
pub fn served_leaf(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the client keeps the server's certificate")
        .to_vec()
}

/// The first certificate of a PEM chain (DER).
pub fn leaf_of(chain_pem: &str) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate in the chain")
        .expect("a PEM certificate")
        .to_vec()
}

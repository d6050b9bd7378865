//! The HTTP client the ACME library talks to the CA with: Beacon's reqwest (rustls on ring),
//! trusting `acme.ca_file` when set (a private CA such as Pebble) and else the system's roots,
//! so the library needs no HTTP stack of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

/// How long one request to the CA may take: ACME answers are small, so a CA that takes longer
/// is down, and the order is retried later.
const CA_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// reqwest as instant-acme's [`HttpClient`].
pub(crate) struct CaClient(reqwest::Client);

impl CaClient {
    pub(crate) fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder().timeout(CA_REQUEST_TIMEOUT);
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        builder
            .build()
            .map(Self)
            .map_err(|e| format!("acme: cannot build the HTTPS client: {e}"))
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: axum::http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // The library's bodies are whole in memory (JWS objects of a few KiB).
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            let request = axum::http::Request::from_parts(parts, body);
            let request = reqwest::Request::try_from(request)
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let response = client
                .execute(request)
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let response: axum::http::Response<reqwest::Body> = response.into();
            Ok(BytesResponse::from(response))
        })
    }
}

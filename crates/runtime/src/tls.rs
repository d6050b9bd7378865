//! TLS configurations for the control links and the HTTP APIs, on rustls with the ring
//! provider: servers present a certificate, clients verify it against the cluster's own CA
//! (never the system roots), and a liveness probe of a service's own socket reads no
//! certificate at all.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {detail}")]
    Pem {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: String },
    #[error("tls set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// The private key's file may be read by its group or others.
    #[error("{0}")]
    SharedKey(#[from] crate::secrets::SecretError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what: "certificates",
            path: shown.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: shown,
        });
    }
    Ok(certs)
}

/// A server config presenting the certificate chain in `cert` with the key in `key` (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    // A private key is a secret like a token: refused when others may read it.
    crate::secrets::check_private(key)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        what: "private key",
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A client config that trusts only the CA certificates in `ca` (PEM).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS side of a control link to `addr` (`host:port`): the name expected in the server's
/// certificate (`server_name`, else the host part of `addr`) and a client config trusting `ca`.
pub fn link_client(
    addr: &str,
    server_name: Option<&str>,
    ca: &Path,
) -> Result<(ServerName<'static>, Arc<rustls::ClientConfig>), TlsError> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']']);
    Ok((
        self::server_name(server_name.unwrap_or(host))?,
        client_config(ca)?,
    ))
}

/// A client config for a service's liveness probe of its own HTTPS listener on this host: it
/// accepts whatever certificate the listener presents, because the probe asks only whether the
/// accept loop and the router answer, sends no token, and must keep working while the
/// certificate is being replaced or has expired (an expired certificate is an operator's alert,
/// not a reason for systemd to restart the service).
pub fn self_probe_config() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The verifier of [`self_probe_config`]: any certificate, signatures still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Parses the name a client expects in the server's certificate.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.into()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA with one server certificate for `beacon.test`: `ca.pem`, `cert.pem`, `key.pem`.
    pub(crate) struct Pki {
        pub(crate) dir: tempfile::TempDir,
    }

    pub(crate) fn make_pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["beacon.test".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        crate::secrets::write_secret_file(&dir.path().join("key.pem"), &key.serialize_pem())
            .unwrap();
        Pki { dir }
    }

    #[tokio::test]
    async fn client_trusting_the_ca_talks_to_the_server() {
        let pki = make_pki();
        let p = |n: &str| pki.dir.path().join(n);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(server_config(&p("cert.pem"), &p("key.pem")).unwrap());
        let connector = tokio_rustls::TlsConnector::from(client_config(&p("ca.pem")).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            tls.write_all(b"hi").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(server_name("beacon.test").unwrap(), tcp)
            .await
            .unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hi");
        server.await.unwrap();

        // The wrong name is refused.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tokio_rustls::TlsAcceptor::from(
                server_config(&p_owned(&pki), &key_owned(&pki)).unwrap(),
            )
            .accept(tcp)
            .await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            connector
                .connect(server_name("other.test").unwrap(), tcp)
                .await
                .is_err()
        );
    }

    fn p_owned(pki: &Pki) -> std::path::PathBuf {
        pki.dir.path().join("cert.pem")
    }
    fn key_owned(pki: &Pki) -> std::path::PathBuf {
        pki.dir.path().join("key.pem")
    }

    #[test]
    fn a_private_key_its_group_may_read_is_refused_naming_the_file_and_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let pki = make_pki();
        let key = key_owned(&pki);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = server_config(&p_owned(&pki), &key).unwrap_err().to_string();
        assert!(err.contains(&key.display().to_string()), "{err}");
        assert!(err.contains("(mode 640)"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(server_config(&p_owned(&pki), &key).is_ok());
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = client_config(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
        let err = client_config(&dir.path().join("none.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.pem"), "{err}");
    }
}

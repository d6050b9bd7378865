//! Tests of Beacon's unbuffered TLS: a `tokio_rustls` client (what Maestro and the repository
//! use) talks to it over TLS 1.3 and 1.2, and an idle link holds no buffer.

use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;

/// Bytes the in-memory pipe holds each way: less than the large messages below, so they cross
/// it in several reads and writes.
const PIPE_BYTES: usize = 8 * 1024;

struct Pair {
    server: Arc<ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn configs(versions: &[&'static rustls::SupportedProtocolVersion]) -> Pair {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let issued = rcgen::generate_simple_self_signed(vec!["beacon.test".to_string()]).unwrap();
    let cert = issued.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pair {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

async fn connect(
    pair: &Pair,
) -> (
    ServerTls<DuplexStream>,
    tokio_rustls::client::TlsStream<DuplexStream>,
) {
    let (a, b) = duplex(PIPE_BYTES);
    let connector = tokio_rustls::TlsConnector::from(pair.client.clone());
    let client = tokio::spawn(async move {
        connector
            .connect(ServerName::try_from("beacon.test").unwrap(), a)
            .await
            .unwrap()
    });
    let server = ServerTls::accept(b, pair.server.clone()).await.unwrap();
    (server, client.await.unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn assert_idle(server: &ServerTls<DuplexStream>) {
    assert_eq!(
        (
            server.incoming.capacity(),
            server.plain.capacity(),
            server.outgoing.capacity()
        ),
        (0, 0, 0),
        "an idle link holds no TLS buffer"
    );
}

async fn exchange_both_ways(versions: &[&'static rustls::SupportedProtocolVersion]) {
    let pair = configs(versions);
    let (mut server, mut client) = connect(&pair).await;
    assert!(!server.conn.is_handshaking());

    // Small and large (many records, more than the pipe holds) both ways, at the same time.
    let small = b"hello beacon".to_vec();
    let large = pattern(200 * 1024, 7);
    let reply = pattern(300 * 1024, 9);
    let (sent_small, sent_large, expected_reply) = (small.clone(), large.clone(), reply.clone());
    let peer = tokio::spawn(async move {
        client.write_all(&sent_small).await.unwrap();
        client.write_all(&sent_large).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; expected_reply.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == expected_reply, "the client got what the server sent");
        client
    });
    let mut got = vec![0u8; small.len() + large.len()];
    // One task drives both directions, as a link's task does.
    let mut read_half = Vec::new();
    {
        let (mut reading, mut writing) = tokio::io::split(&mut server);
        let read = async {
            reading.read_exact(&mut got).await.unwrap();
        };
        let write = async {
            writing.write_all(&reply).await.unwrap();
            writing.flush().await.unwrap();
        };
        tokio::join!(read, write);
        read_half.extend_from_slice(&got);
    }
    assert!(
        read_half[..small.len()] == small[..],
        "the small message arrived first"
    );
    assert!(
        read_half[small.len()..] == large[..],
        "the large message arrived whole"
    );
    let mut client = peer.await.unwrap();
    assert_idle(&server);

    // The server's clean close reaches the client as the end of the stream, not an error.
    server.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // And the client's close reaches the server as one.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn tls13_carries_data_both_ways_and_an_idle_link_holds_no_buffer() {
    exchange_both_ways(&[&rustls::version::TLS13]).await;
}

#[tokio::test]
async fn tls12_carries_data_both_ways_and_an_idle_link_holds_no_buffer() {
    exchange_both_ways(&[&rustls::version::TLS12]).await;
}

#[tokio::test]
async fn a_peer_that_does_not_speak_tls_is_refused_in_the_handshake() {
    let pair = configs(&[&rustls::version::TLS13]);
    let (mut a, b) = duplex(PIPE_BYTES);
    a.write_all(b"GET / HTTP/1.1\r\nHost: beacon.test\r\n\r\n")
        .await
        .unwrap();
    let err = ServerTls::accept(b, pair.server.clone())
        .await
        .err()
        .expect("no handshake with a peer speaking HTTP");
    assert!(!err.to_string().is_empty());
    // rustls's alert for it is sent before the close: a TLS alert record.
    let mut alert = [0u8; 1];
    a.read_exact(&mut alert).await.unwrap();
    assert_eq!(alert[0], 0x15, "an alert record");
}

#[tokio::test]
async fn a_close_during_the_handshake_is_an_error() {
    let pair = configs(&[&rustls::version::TLS13]);
    let (a, b) = duplex(PIPE_BYTES);
    drop(a);
    let err = ServerTls::accept(b, pair.server.clone())
        .await
        .err()
        .expect("no handshake without a peer");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn a_connection_cut_without_close_notify_is_an_error_not_an_end() {
    let pair = configs(&[&rustls::version::TLS13]);
    let (mut server, client) = connect(&pair).await;
    // The TCP side goes away without TLS's close_notify: what a cut connection looks like.
    let (io, _) = client.into_inner();
    drop(io);
    let mut buf = [0u8; 16];
    let err = server.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn a_peer_sending_an_oversized_record_is_cut_off() {
    let pair = configs(&[&rustls::version::TLS13]);
    let (mut server, client) = connect(&pair).await;
    let (mut io, _) = client.into_inner();
    // An application-data record header announcing more than TLS allows, then its "body".
    let flood = tokio::spawn(async move {
        let _ = io.write_all(&[0x17, 0x03, 0x03, 0xff, 0xff]).await;
        let junk = vec![0u8; PIPE_BYTES];
        while io.write_all(&junk).await.is_ok() {}
    });
    let mut buf = [0u8; 16];
    server
        .read(&mut buf)
        .await
        .expect_err("a record over TLS's size is an error");
    drop(server);
    flood.await.unwrap();
}

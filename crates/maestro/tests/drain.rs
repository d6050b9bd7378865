//! Draining long-lived connections over real sockets: WebSocket and server-sent-event clients
//! held open through the proxy when their instance is drained get a reconnect hint (close
//! 1012, `retry:`) at a message boundary, at moments spread over the drain budget; a
//! connection that never reaches a boundary is cut at the deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common_proxy;

use std::net::SocketAddr;
use std::time::Duration;

use common_proxy::*;
use futures_util::StreamExt as _;
use px_maestro::internals::{Backend, ProxySettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The drain budget of the tests: long enough to see the closes spread, short for a test.
const BUDGET: Duration = Duration::from_secs(2);
/// Clients of each kind held open across the drain.
const CLIENTS: usize = 6;
/// How often the upstreams send a message.
const TICK: Duration = Duration::from_millis(40);

async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if tcp.read_exact(&mut b).await.is_err() {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// A WebSocket instance: answers the upgrade, then sends a text frame every tick (every third
/// one 70 000 bytes long, so frames span many reads) until the connection goes.
async fn websocket_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                assert!(read_head(&mut tcp).await.contains("upgrade: websocket"));
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: test\r\n\r\n";
                if tcp.write_all(answer).await.is_err() {
                    return;
                }
                for n in 0u64.. {
                    let payload = if n % 3 == 2 {
                        vec![b'x'; 70_000]
                    } else {
                        format!("tick {n}").into_bytes()
                    };
                    let mut frame = vec![0x81];
                    if payload.len() < 126 {
                        frame.push(payload.len() as u8);
                    } else {
                        frame.push(127);
                        frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
                    }
                    frame.extend_from_slice(&payload);
                    if tcp.write_all(&frame).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(TICK).await;
                }
            });
        }
    });
    addr
}

/// An event-stream instance: `data: tick N` events, each written in two pieces, every tick.
async fn sse_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_head(&mut tcp).await;
                let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
                if tcp.write_all(head).await.is_err() {
                    return;
                }
                for n in 0u64.. {
                    for piece in [format!("data: tick {n}"), "\n\n".to_string()] {
                        let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
                        if tcp.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(TICK / 2).await;
                    }
                }
            });
        }
    });
    addr
}

/// One WebSocket frame as the client reads it: opcode and payload.
async fn read_frame(conn: &mut RawConn) -> (u8, Vec<u8>) {
    let head = conn.read_exact(2).await;
    let len = match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes(
            conn.read_exact(2).await.try_into().unwrap(),
        )),
        127 => u64::from_be_bytes(conn.read_exact(8).await.try_into().unwrap()),
        n => u64::from(n),
    };
    (head[0] & 0x0f, conn.read_exact(len as usize).await)
}

/// Opens a WebSocket through the proxy, reads frames until the close, and returns when the
/// close came and its code.
async fn websocket_client(proxy: SocketAddr) -> (Instant, u16, usize) {
    let mut conn = RawConn::connect(proxy).await;
    conn.send(
        b"GET /socket HTTP/1.1\r\nHost: ws.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(conn.head().await.unwrap().status, 101);
    let mut frames = 0;
    loop {
        let (opcode, payload) = read_frame(&mut conn).await;
        if opcode == 0x8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            assert!(
                conn.closed().await,
                "the proxy closes after its close frame"
            );
            return (Instant::now(), code, frames);
        }
        assert_eq!(opcode, 0x1, "only whole text frames before the close");
        assert!(payload.starts_with(b"tick") || payload.iter().all(|b| *b == b'x'));
        frames += 1;
    }
}

/// Reads an event stream through the proxy to its end; returns when it ended and its text.
async fn sse_client(client: reqwest::Client, url: String) -> (Instant, String) {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    (Instant::now(), String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_event_stream_clients_get_reconnect_hints_spread_over_the_drain() {
    let ws = Backend::new("ws", 1, websocket_upstream().await);
    let sse = Backend::new("sse", 1, sse_upstream().await);
    let proxy = Harness::start(
        table(&[
            ("ws.localhost", route("ws", vec![ws.clone()], vec![])),
            ("sse.localhost", route("sse", vec![sse.clone()], vec![])),
        ]),
        ProxySettings::default(),
    )
    .await;
    let http = proxy.client(&["sse.localhost"]);
    let ws_clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(websocket_client(proxy.addr)))
        .collect();
    let sse_clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(sse_client(
                http.clone(),
                proxy.url("sse.localhost", "/events"),
            ))
        })
        .collect();
    eventually("every client connected", || {
        ws.long_lived_open() == CLIENTS && sse.long_lived_open() == CLIENTS
    })
    .await;
    // Let some messages through first.
    tokio::time::sleep(TICK * 5).await;

    let started = Instant::now();
    ws.start_drain(BUDGET);
    sse.start_drain(BUDGET);
    let mut moments = Vec::new();
    for client in ws_clients {
        let (at, code, frames) = tokio::time::timeout(PATIENCE, client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(code, 1012, "WebSocket close code Service Restart");
        assert!(frames > 0, "frames passed before the close");
        moments.push(at - started);
    }
    for client in sse_clients {
        let (at, text) = tokio::time::timeout(PATIENCE, client)
            .await
            .unwrap()
            .unwrap();
        let (events, retry) = text
            .rsplit_once("retry: ")
            .expect("a retry hint ends the stream");
        assert!(events.starts_with("data: tick 0\n\n"), "{events:?}");
        assert!(
            events.ends_with("\n\n"),
            "the hint comes between whole events: {events:?}"
        );
        let ms: u64 = retry.strip_suffix("\n\n").unwrap().parse().unwrap();
        assert!(px_maestro::internals::SSE_RETRY_MS.contains(&ms), "{ms}");
        moments.push(at - started);
    }
    moments.sort();
    let (first, last) = (moments[0], moments[moments.len() - 1]);
    println!("closes from {first:?} to {last:?} after the drain order (budget {BUDGET:?})");
    // The closes themselves happen by 80% of the budget; the clients see them a little later
    // on a busy machine. `cut == 0` below is the guarantee that none met the deadline.
    assert!(
        last < BUDGET + Duration::from_secs(1),
        "every client saw its close around the budget: {moments:?}"
    );
    assert!(
        last - first > BUDGET / 4,
        "closes are spread over the budget, not in one burst: {moments:?}"
    );
    for (kind, backend) in [("websocket", &ws), ("event stream", &sse)] {
        // A connection is counted once its task has sent the close, which its client may read
        // first on a busy machine.
        eventually("every close counted", || {
            backend.drain_outcome().closed + backend.drain_outcome().cut >= CLIENTS as u64
        })
        .await;
        let outcome = backend.drain_outcome();
        assert_eq!((outcome.closed, outcome.cut), (CLIENTS as u64, 0), "{kind}");
        eventually("nothing left open", || {
            backend.long_lived_open() == 0 && backend.in_flight() == 0
        })
        .await;
    }
}

#[tokio::test]
async fn a_connection_that_never_reaches_a_boundary_is_cut_at_the_deadline() {
    // An instance that announces a 1 MiB frame and then sends it a byte at a time, too slowly
    // to finish within the budget: there is no place for a close frame.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        read_head(&mut tcp).await;
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        tcp.write_all(answer).await.unwrap();
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
        tcp.write_all(&frame).await.unwrap();
        while tcp.write_all(b"y").await.is_ok() {
            tokio::time::sleep(TICK).await;
        }
    });
    let instance = Backend::new("slow", 1, addr);
    let proxy = Harness::start(
        table(&[(
            "slow.localhost",
            route("slow", vec![instance.clone()], vec![]),
        )]),
        ProxySettings::default(),
    )
    .await;
    let mut conn = proxy.raw().await;
    conn.send(
        b"GET / HTTP/1.1\r\nHost: slow.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(conn.head().await.unwrap().status, 101);
    let header = conn.read_exact(10).await;
    assert_eq!(header[0], 0x82);
    let budget = Duration::from_millis(600);
    let started = Instant::now();
    instance.start_drain(budget);
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, conn.stream.read(&mut chunk))
            .await
            .unwrap()
        {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    let ended = started.elapsed();
    assert!(
        received.iter().all(|b| *b == b'y'),
        "no close frame inside a frame"
    );
    assert!(
        ended >= budget,
        "cut at the deadline, not before: {ended:?}"
    );
    assert_eq!(instance.drain_outcome().cut, 1);
    assert_eq!(instance.drain_outcome().closed, 0);
    eventually("nothing left open", || instance.long_lived_open() == 0).await;
}

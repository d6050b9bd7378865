//! A TCP relay that can be cut without a word: what a control host whose network is cut, or
//! that froze, looks like to its peers. Until [`Relay::cut`] it forwards every connection to
//! its target; from then on it forwards nothing, in either direction, and closes nothing
//! (no FIN, no RST): open connections fall silent, and new ones are accepted and never
//! answered, as a connect to a host that stopped mid-flight is left hanging.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Relay {
    pub addr: SocketAddr,
    cut: CancellationToken,
}

impl Relay {
    /// A relay on a new loopback port to `target`, until `shutdown`.
    pub async fn start(target: SocketAddr, shutdown: CancellationToken) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        // Connections the cut left open, held until the stack ends.
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept_cut = cut.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if accept_cut.is_cancelled() {
                    held.lock().unwrap().push(client);
                    continue;
                }
                let (cut, held) = (accept_cut.clone(), Arc::clone(&held));
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {
                            let mut held = held.lock().unwrap();
                            held.push(client);
                            held.push(upstream);
                        }
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    /// Stops forwarding, keeping every connection open.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

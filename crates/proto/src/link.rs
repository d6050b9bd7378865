//! Messages of the TCP control links (DESIGN.md §3.2): the handshake every peer starts with,
//! and what the repository tells Beacon. Carried as frames by [`crate::codec`].

use serde::{Deserialize, Serialize};

/// Version of the link protocol; a peer with another version is refused with a reason.
pub const PROTOCOL_VERSION: u32 = 1;

/// What kind of peer opens a link to Beacon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    Repository,
    Maestro,
}

/// First frame a peer sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub role: PeerRole,
    /// Host or instance name, for logs and the status page.
    pub name: String,
    /// The peer's token; Beacon compares its hash.
    pub token: String,
    /// Software version, for the status page.
    pub software: String,
}

/// A frame from a peer (repository or Maestro) to Beacon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToBeacon {
    Hello(Hello),
    /// Keeps the link alive and proves the peer is responsive.
    Heartbeat,
    /// A release was committed; Beacon should assign it.
    ReleaseCommitted(ReleaseCommitted),
}

/// A frame from Beacon to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromBeacon {
    Welcome {
        protocol: u32,
        beacon: String,
    },
    /// The handshake failed; the peer should log `reason` and back off.
    Rejected {
        reason: String,
    },
    Heartbeat,
}

/// Notice that a release of an app is committed in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseCommitted {
    pub app: String,
    pub version: u64,
    pub bundle_sha256: String,
}

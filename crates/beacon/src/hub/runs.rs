//! Where a one-off command (`em run`) may run: the linked nodes that run the app's current
//! release, each with the queue that reaches its link.

use super::{CommandSender, Hub};

/// A node that can take a run.
#[derive(Debug, Clone)]
pub struct RunNode {
    pub name: String,
    /// The link connection the run is bound to: a replaced connection ends the run.
    pub conn: u64,
    pub commands: CommandSender,
}

/// Why no node can take a run of an app.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunPlaceError {
    #[error("{0} has no current release; deploy it first (`em deploy`)")]
    NoRelease(String),
    #[error("no linked node runs {app} v{release} yet; see `em status`")]
    NoNode { app: String, release: u64 },
}

impl Hub {
    /// The app's current release and the linked nodes whose last report shows a process of
    /// it: a node that runs the release has it unpacked, so a run starts at once.
    pub fn run_nodes(&self, app: &str) -> Result<(u64, Vec<RunNode>), RunPlaceError> {
        let state = self.lock();
        let Some(release) = state.desired.get(app).map(|r| r.version) else {
            return Err(RunPlaceError::NoRelease(app.to_string()));
        };
        let nodes: Vec<RunNode> = state
            .nodes
            .iter()
            .filter(|(_, n)| n.connected && !n.lost)
            .filter(|(_, n)| {
                n.report
                    .instances
                    .iter()
                    .any(|i| i.app == app && i.release == release)
            })
            .map(|(name, n)| RunNode {
                name: name.clone(),
                conn: n.conn,
                commands: n.commands.clone(),
            })
            .collect();
        if nodes.is_empty() {
            return Err(RunPlaceError::NoNode {
                app: app.to_string(),
                release,
            });
        }
        Ok((release, nodes))
    }
}

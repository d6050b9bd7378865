//! What the `beacon` binary does besides parsing: the serve loop, with the listeners systemd
//! passed (`api` for the HTTP API, `control` for the links) or else bound from the config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use px_runtime::systemd::{self, Activation, Systemd};

use crate::config::{Config, ENV_PREFIX};

/// Reads the configuration as `main` did: defaults, then `file`, then `PX_BEACON_*`.
pub fn load_config(file: Option<&Path>) -> Result<Config, px_runtime::config::ConfigError> {
    px_runtime::config::load(&Config::default(), file, ENV_PREFIX)
}

pub fn serve(config: Config, file: Option<PathBuf>) -> ExitCode {
    px_runtime::service::serve("beacon", |shutdown| async move {
        let mut activation = Activation::from_env().map_err(std::io::Error::from)?;
        let listeners = crate::Listeners {
            http: systemd::listener(&mut activation, "api", config.http_listen).await?,
            control: if config.lease.enabled {
                // With a lease, Beacon binds `control_listen` itself once it is active (a
                // standby must refuse links); `run` still takes a listener, so it gets one on
                // an ephemeral loopback port, which it releases at once.
                if activation
                    .take("control")
                    .map_err(std::io::Error::from)?
                    .is_some()
                {
                    tracing::warn!(
                        "systemd passed a `control` socket, but with [lease] Beacon binds control_listen itself once active; remove it from the socket unit"
                    );
                }
                tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?
            } else {
                systemd::listener(&mut activation, "control", config.control_listen).await?
            },
        };
        // Any socket systemd passed that Beacon does not take is closed here, with a warning.
        drop(activation);
        let systemd = Systemd::from_env(move || load_config(file.as_deref()))?;
        crate::run_with(config, listeners, shutdown, systemd).await
    })
}

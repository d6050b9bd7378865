//! Where `em` keeps things: its config (`$XDG_CONFIG_HOME/em/config.toml`, mode 0600, with the
//! remote and the token) and `em up`'s data directory (`$XDG_DATA_HOME/platformx`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::failure::{EXIT_NOT_CONFIGURED, Failure, Result};

/// Most Beacon URLs em's config may list: a control plane runs a few Beacons, and a call to a
/// Beacon that is down costs up to [`crate::client::CONNECT_TIMEOUT`] before the next is tried.
pub const MAX_BEACON_URLS: usize = 16;

/// What `em` needs to talk to a platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmConfig {
    /// apprepo's base URL.
    pub remote: String,
    /// Beacon's API base URL, when the platform runs one Beacon (or a load balancer fronts
    /// them). Give this or `beacons`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beacon: Option<String>,
    /// Every Beacon's API base URL (at most [`MAX_BEACON_URLS`]): em calls the one that
    /// answered last, moves on when one cannot be reached, and follows a standby's redirect to
    /// the active one. Give this or `beacon`, not both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub beacons: Vec<String>,
    /// A deploy token.
    pub token: String,
    /// How apps are reached, with `{app}` for the name (set by `em up`). Default: none, and
    /// `em deploy` shows the app's domains instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
    /// PEM file of the CA that signed apprepo's and Beacon's certificates (the cluster's own),
    /// trusted instead of the public roots. Default: none (the public roots, for a platform
    /// behind a proxy with a public certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` URLs to other machines (tokens in the clear), as `--insecure` does.
    /// Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

impl EmConfig {
    /// Every Beacon URL, whichever key holds them, checked: one key of the two, at most
    /// [`MAX_BEACON_URLS`], none twice.
    pub fn beacon_urls(&self) -> Result<Vec<&str>> {
        let urls: Vec<&str> = match (&self.beacon, self.beacons.as_slice()) {
            (Some(_), [_, ..]) => {
                return Err(Failure::usage(
                    "em's config gives both `beacon` and `beacons`; keep one (`em login --beacon URL --beacon URL` writes `beacons`)",
                ));
            }
            (None, []) => {
                return Err(Failure::usage(
                    "em's config names no Beacon; run `em login --remote URL` (with `--beacon URL` for each Beacon) again",
                ));
            }
            (Some(url), []) => vec![url.as_str()],
            (None, urls) => urls.iter().map(String::as_str).collect(),
        };
        if urls.len() > MAX_BEACON_URLS {
            return Err(Failure::usage(format!(
                "em's config lists {} Beacon URLs; at most {MAX_BEACON_URLS}",
                urls.len()
            )));
        }
        for (i, url) in urls.iter().enumerate() {
            if urls[..i].contains(url) {
                return Err(Failure::usage(format!(
                    "em's config lists the Beacon URL {url} twice"
                )));
            }
        }
        Ok(urls)
    }

    /// Sets the Beacon URLs: one as `beacon` (as em has always written it), several as
    /// `beacons`.
    pub fn set_beacon_urls(&mut self, mut urls: Vec<String>) {
        if urls.len() == 1 {
            self.beacon = urls.pop();
            self.beacons = Vec::new();
        } else {
            self.beacon = None;
            self.beacons = urls;
        }
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

pub fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"))
        .join("em")
}

pub fn config_file() -> PathBuf {
    config_dir().join("config.toml")
}

pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
        .join("platformx")
}

pub fn load() -> Result<EmConfig> {
    let path = config_file();
    let text = std::fs::read_to_string(&path).map_err(|_| {
        Failure::new(
            EXIT_NOT_CONFIGURED,
            format!(
                "em has no platform to talk to ({} is missing); run `em up` for one on this machine, or `em login --remote URL` for a cluster",
                path.display()
            ),
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        Failure::new(
            EXIT_NOT_CONFIGURED,
            format!(
                "{} is not valid ({}); run `em login` again to rewrite it",
                path.display(),
                e.message()
            ),
        )
    })
}

pub fn save(config: &EmConfig) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = config_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let path = config_file();
    let text = toml::to_string(config).map_err(|e| Failure::failed(e.to_string()))?;
    // Written aside and renamed, so a command reading it meanwhile sees the old or the new one.
    let tmp = path.with_extension("toml.tmp");
    px_runtime::secrets::write_secret_file(&tmp, &text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

//! What the `apprepo` binary does besides parsing: token helpers and the serve loop, on the
//! socket systemd passed (`api`) or else the configured address.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use px_runtime::systemd::{self, Activation, Systemd};

use crate::config::{Config, ENV_PREFIX};

pub fn token_new(name: &str, role: &str) -> ExitCode {
    if !matches!(role, "deploy" | "read" | "build" | "release" | "beacon") {
        eprintln!("apprepo: --role must be `deploy`, `read`, `build`, `release` or `beacon`");
        return ExitCode::from(2);
    }
    let token = px_runtime::tokens::generate();
    println!("{token}");
    eprintln!(
        "add this to the tokens file:\n[[token]]\nname = {name:?}\nrole = {role:?}\nsha256 = {:?}",
        px_runtime::tokens::hash(&token)
    );
    ExitCode::SUCCESS
}

pub fn token_hash() -> ExitCode {
    let mut token = String::new();
    if std::io::stdin()
        .take(px_runtime::tokens::MAX_TOKEN_LEN as u64 + 2)
        .read_to_string(&mut token)
        .is_err()
    {
        eprintln!("apprepo: could not read a token from stdin");
        return ExitCode::from(2);
    }
    println!("{}", px_runtime::tokens::hash(token.trim()));
    ExitCode::SUCCESS
}

/// Reads the configuration as `main` did: defaults, then `file`, then `PX_APPREPO_*`.
pub fn load_config(file: Option<&Path>) -> Result<Config, px_runtime::config::ConfigError> {
    px_runtime::config::load(&Config::default(), file, ENV_PREFIX)
}

/// Serves on the socket systemd passed as `api`, or else on `listen`.
pub fn serve(config: Config, file: Option<PathBuf>) -> ExitCode {
    px_runtime::service::serve("apprepo", |shutdown| async move {
        let mut activation = Activation::from_env().map_err(std::io::Error::from)?;
        let listener = systemd::listener(&mut activation, "api", config.listen).await?;
        // Any socket systemd passed that apprepo does not take is closed here, with a warning.
        drop(activation);
        let systemd = Systemd::from_env(move || load_config(file.as_deref()))?;
        crate::run_with(config, listener, shutdown, systemd).await
    })
}

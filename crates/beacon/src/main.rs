//! The `beacon` binary: parse arguments, load config, and hand over to [`px_beacon::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "beacon",
    version,
    about = "Platform.X AppMonitor: control links, rollouts, events, status page"
)]
struct Args {
    /// TOML config file; `PX_BEACON_*` environment variables override it.
    #[arg(long, short, env = "PX_BEACON_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration (tokens, TLS material, secret files) and exit: 0 if good, 78 if not.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    px_runtime::telemetry::init();
    let config = match px_beacon::cli::load_config(args.config.as_deref())
        .and_then(|c| px_beacon::check(&c).map(|_| c))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("beacon: {e}");
            return ExitCode::from(px_runtime::EX_CONFIG as u8);
        }
    };
    if args.check_config {
        println!("beacon: configuration is valid");
        return ExitCode::SUCCESS;
    }
    px_beacon::cli::serve(config, args.config)
}

//! The `maestro` binary: parse arguments, load config, and hand over to [`px_maestro::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "maestro",
    version,
    about = "Platform.X AppController: runs apps, switches releases, proxies HTTP"
)]
struct Args {
    /// TOML config file; `PX_MAESTRO_*` environment variables override it.
    #[arg(long, short, env = "PX_MAESTRO_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration and exit: 0 if good, 78 if not.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    px_runtime::telemetry::init();
    let config = match px_maestro::cli::load_config(args.config.as_deref())
        .and_then(|c| px_maestro::check(&c).map(|_| c))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("maestro: {e}");
            return ExitCode::from(px_runtime::EX_CONFIG as u8);
        }
    };
    if args.check_config {
        println!("maestro: configuration is valid");
        return ExitCode::SUCCESS;
    }
    px_maestro::cli::serve(config, args.config)
}

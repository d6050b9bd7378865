//! The `apprepo` binary: parse arguments, load config, bind, and hand over to [`px_repository::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "apprepo",
    version,
    about = "Platform.X AppRepository: bundle uploads, storage and releases"
)]
struct Args {
    /// TOML config file; `PX_APPREPO_*` environment variables override it.
    #[arg(long, short, env = "PX_APPREPO_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration (tokens, secret files, TLS material) and exit: 0 if good, 78 if not.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new random token on stdout and its `[[token]]` entry on stderr.
    TokenNew {
        #[arg(long)]
        name: String,
        /// `deploy`, `read` or `build`.
        #[arg(long)]
        role: String,
    },
    /// Read a token from stdin and print its SHA-256, the form stored in the token file.
    TokenHash,
}

fn main() -> ExitCode {
    let args = Args::parse();
    px_runtime::telemetry::init();
    match args.command {
        Some(Command::TokenNew { name, role }) => {
            return px_repository::cli::token_new(&name, &role);
        }
        Some(Command::TokenHash) => return px_repository::cli::token_hash(),
        None => {}
    }
    let config = match px_repository::cli::load_config(args.config.as_deref())
        .and_then(|c| px_repository::check(&c).map(|_| c))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("apprepo: {e}");
            return ExitCode::from(px_runtime::EX_CONFIG as u8);
        }
    };
    if args.check_config {
        println!("apprepo: configuration is valid");
        return ExitCode::SUCCESS;
    }
    px_repository::cli::serve(config, args.config)
}

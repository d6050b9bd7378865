//! The `em` binary: parse the command line and run the command; failures print one paragraph
//! naming the problem and the fix, and exit with a code from [`failure`].

mod beacons;
mod cli;
mod client;
mod commands;
mod deploy;
mod dev;
mod domains;
mod failure;
mod feed;
mod init;
mod processes;
mod release_phase;
mod run;
mod safe_text;
mod settings;
mod tokens;
mod up;
mod up_https;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::failure::Failure;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // An empty message is a remote command's exit code (`em run`), said by itself.
            if !failure.message.is_empty() {
                eprintln!("em: {failure}");
            }
            ExitCode::from(failure.code)
        }
    }
}

fn run(cli: Cli) -> failure::Result<()> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Failure::failed(format!("cannot start: {e}")))?;
    let json = cli.json;
    commands::set_insecure(cli.insecure);
    match cli.command {
        Command::Up(args) => {
            px_runtime::telemetry::init();
            runtime.block_on(up::up(args))
        }
        Command::Init {
            dir,
            name,
            template,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            match init::init(&dir, name.as_deref(), template)? {
                init::Created::Template { name: app } if json => {
                    println!("{}", serde_json::json!({ "app": app, "dir": dir }));
                }
                init::Created::Template { name: app } => println!(
                    "created app {app} in {}\nnext: cd {} && em deploy",
                    dir.display(),
                    dir.display()
                ),
                init::Created::Existing { name: app, lines } if json => println!(
                    "{}",
                    serde_json::json!({ "app": app, "dir": dir, "detected": lines })
                ),
                init::Created::Existing { name: app, lines } => {
                    println!("wrote app.toml for app {app} in {}; found:", dir.display());
                    for line in lines {
                        println!("  {line}");
                    }
                    if dir == std::path::Path::new(".") {
                        println!("next: em deploy");
                    } else {
                        println!("next: cd {} && em deploy", dir.display());
                    }
                }
            }
            Ok(())
        }
        Command::Dev { dir, port } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            runtime.block_on(dev::dev(&dir, port))
        }
        Command::Deploy {
            dir,
            app,
            no_wait,
            message,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let client = commands::client()?;
            runtime.block_on(deploy::deploy(
                &client,
                deploy::Options {
                    dir: &dir,
                    app: app.as_deref(),
                    wait: !no_wait,
                    message: message.as_deref(),
                    json,
                },
            ))
        }
        Command::Status => runtime.block_on(commands::status(&commands::client()?, json)),
        Command::Apps => runtime.block_on(commands::apps(&commands::client()?, json)),
        Command::Releases { app, build_log } => {
            let app = commands::app_name(app)?;
            let client = commands::client()?;
            match build_log {
                Some(release) => {
                    runtime.block_on(commands::build_log(&client, &app, &release, json))
                }
                None => runtime.block_on(commands::releases(&client, &app, json)),
            }
        }
        Command::Rollback { release, app } => {
            let app = commands::app_name(app)?;
            runtime.block_on(commands::rollback(
                &commands::client()?,
                &app,
                release,
                json,
            ))
        }
        Command::Config { app, change } => {
            let app = commands::app_name(app)?;
            runtime.block_on(commands::config(&commands::client()?, &app, change, json))
        }
        Command::Logs { app, follow, lines } => {
            let app = commands::app_name(app)?;
            runtime.block_on(commands::logs(
                &commands::client()?,
                &app,
                follow,
                lines,
                json,
            ))
        }
        Command::Login {
            remote,
            beacon,
            token_file,
            ca_file,
        } => runtime.block_on(commands::login(
            remote,
            beacon,
            token_file.as_deref(),
            ca_file,
        )),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "em", &mut std::io::stdout());
            Ok(())
        }
        Command::Run {
            app,
            detach,
            command,
        } => {
            let app = commands::app_name(app)?;
            runtime.block_on(run::run(&commands::client()?, &app, command, detach))
        }
        Command::Scale { app, pairs } => {
            let app = commands::app_name(app)?;
            runtime.block_on(processes::scale(&commands::client()?, &app, &pairs, json))
        }
        Command::Ps { app } => {
            let app = commands::app_name(app)?;
            runtime.block_on(processes::ps(&commands::client()?, &app, json))
        }
        Command::Domains { action } => {
            runtime.block_on(domains::domains(&commands::client, action, json))
        }
        Command::Tokens { action } => {
            runtime.block_on(tokens::tokens(&commands::client()?, action, json))
        }
    }
}

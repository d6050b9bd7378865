//! What the `apprepo` binary does besides parsing: token helpers and the serve loop.

use std::io::Read;
use std::process::ExitCode;

use crate::config::Config;

pub fn token_new(name: &str, role: &str) -> ExitCode {
    if !matches!(role, "deploy" | "read") {
        eprintln!("apprepo: --role must be `deploy` or `read`");
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

pub fn serve(config: Config) -> ExitCode {
    px_runtime::service::serve("apprepo", |shutdown| async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        crate::run(config, listener, shutdown).await
    })
}

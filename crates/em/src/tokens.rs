//! `em tokens`: mint, list and revoke tokens limited to some apps, through apprepo's
//! `/v1/tokens` (apprepo keeps only their hashes and tells Beacon of them).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use px_proto::api::{MintToken, MintedRole, TokenInfo, TokenMinted};

use crate::cli::{TokenRole, TokensAction};
use crate::client::Client;
use crate::commands::print_json;
use crate::failure::{Failure, Result};

pub async fn tokens(client: &Client, action: TokensAction, json: bool) -> Result<()> {
    match action {
        TokensAction::Create {
            name,
            apps,
            role,
            expires,
        } => {
            let expires_in_secs = expires
                .map(|text| {
                    humantime::parse_duration(&text)
                        .map(|d| d.as_secs())
                        .map_err(|e| {
                            Failure::usage(format!("--expires {text:?}: {e}; write 30d or 12h"))
                        })
                })
                .transpose()?;
            let request = MintToken {
                name,
                role: match role {
                    TokenRole::Deploy => MintedRole::Deploy,
                    TokenRole::Read => MintedRole::Read,
                },
                apps,
                expires_in_secs,
            };
            let minted: TokenMinted = client
                .send_json(reqwest::Method::POST, &client.repo("/v1/tokens"), &request)
                .await?;
            if json {
                print_json(&minted);
            } else {
                // The token alone on stdout, so `em tokens create ... > file` keeps just it.
                println!("{}", minted.token);
                eprintln!(
                    "{} ({} of {}) {}; it is shown only now",
                    minted.info.name,
                    minted.info.role.as_str(),
                    minted.info.apps.join(", "),
                    expires_text(minted.info.expires_at)
                );
            }
        }
        TokensAction::List => {
            let list: Vec<TokenInfo> = client.get(&client.repo("/v1/tokens")).await?;
            if json {
                print_json(&list);
            } else if list.is_empty() {
                println!("no minted tokens; `em tokens create NAME --apps APP`");
            } else {
                for t in list {
                    println!(
                        "{}  {}  {}  by {}  {}",
                        t.name,
                        t.role.as_str(),
                        t.apps.join(","),
                        t.created_by,
                        expires_text(t.expires_at)
                    );
                }
            }
        }
        TokensAction::Revoke { name } => {
            let url = client.repo(&format!("/v1/tokens/{name}"));
            let info: TokenInfo = client.send_json(reqwest::Method::DELETE, &url, &()).await?;
            if json {
                print_json(&info);
            } else {
                println!(
                    "{} revoked; apprepo refuses it now, Beacon within seconds",
                    info.name
                );
            }
        }
    }
    Ok(())
}

/// "expires 2027-01-05T10:00:00Z", or "expired" for a time gone by.
fn expires_text(expires_at: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(expires_at);
    if at <= SystemTime::now() {
        "expired".to_string()
    } else {
        format!("expires {}", humantime::format_rfc3339_seconds(at))
    }
}

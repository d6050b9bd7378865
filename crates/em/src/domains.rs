//! `em domains`: the host names an app is served on. Adding and removing go through apprepo
//! (`/v1/apps/{app}/domains`, no release); `list` joins apprepo's names (manifest, added) with
//! what Beacon serves the app on, which adds `<app>.<cluster domain>`.

use px_proto::api::{AddDomain, DomainEntry, DomainSource, Domains};

use crate::cli::DomainsAction;
use crate::client::Client;
use crate::commands::{app_name, print_json};
use crate::failure::{Failure, Result};

/// Longest host name accepted before asking apprepo, which checks it fully.
const MAX_NAME_LEN: usize = px_proto::names::MAX_DOMAIN_LEN;

/// Host names are case-insensitive and may be written fully qualified (`shop.example.com.`):
/// apprepo keeps the lowercase form without the final dot.
fn normalise(name: &str) -> Result<String> {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Failure::usage(format!(
            "a host name is 1 to {MAX_NAME_LEN} characters, such as shop.example.com"
        )));
    }
    Ok(name)
}

/// Runs `em domains ACTION`; `client` is made only once the app and name are known good.
pub async fn domains(
    client: &dyn Fn() -> Result<Client>,
    action: DomainsAction,
    json: bool,
) -> Result<()> {
    match action {
        DomainsAction::Add { app, name } => {
            let app = app_name(app)?;
            let name = normalise(&name)?;
            let client = client()?;
            let url = client.repo(&format!("/v1/apps/{app}/domains"));
            let body = AddDomain {
                domain: name.clone(),
            };
            let domains: Domains = client.send_json(reqwest::Method::POST, &url, &body).await?;
            if json {
                print_json(&domains);
            } else {
                println!(
                    "{app} is served on {name} too; the web servers route it within seconds, with no deploy (point its DNS at them)"
                );
            }
        }
        DomainsAction::Remove { app, name } => {
            let app = app_name(app)?;
            let name = normalise(&name)?;
            let client = client()?;
            let url = client.repo(&format!("/v1/apps/{app}/domains/{name}"));
            let domains: Domains = client.send_json(reqwest::Method::DELETE, &url, &()).await?;
            if json {
                print_json(&domains);
            } else {
                println!("{app} is no longer served on {name}");
            }
        }
        DomainsAction::List { app } => {
            let app = app_name(app)?;
            let client = client()?;
            let mut domains: Domains = client
                .get(&client.repo(&format!("/v1/apps/{app}/domains")))
                .await?;
            // Beacon knows the cluster's domain; an app it does not serve yet (no release) or
            // a Beacon out of reach leaves the list at what apprepo knows.
            let served: Option<px_proto::beacon::App> = client
                .get(&client.beacon(&format!("/v1/apps/{app}")))
                .await
                .ok();
            add_served(
                &mut domains,
                served.as_ref().map_or(&[][..], |a| &a.domains),
            );
            if json {
                print_json(&domains);
            } else {
                print!("{}", table(&domains));
            }
        }
    }
    Ok(())
}

/// Adds the names Beacon serves that apprepo does not list: the cluster's.
fn add_served(domains: &mut Domains, served: &[String]) {
    for name in served {
        if !domains.domains.iter().any(|e| &e.domain == name) {
            domains.domains.push(DomainEntry {
                domain: name.clone(),
                source: DomainSource::Cluster,
                certificate: None,
            });
        }
    }
}

/// The names as aligned columns: `shop.example.com  added  -`.
fn table(domains: &Domains) -> String {
    if domains.domains.is_empty() {
        return format!(
            "{} has no host names yet; `em domains add NAME`, or deploy it\n",
            domains.app
        );
    }
    let rows: Vec<[String; 3]> = domains
        .domains
        .iter()
        .map(|e| {
            [
                e.domain.clone(),
                e.source.as_str().to_string(),
                e.certificate
                    .as_ref()
                    .map_or("-".to_string(), |c| c.state.clone()),
            ]
        })
        .collect();
    let header = ["DOMAIN".to_string(), "SOURCE".into(), "CERTIFICATE".into()];
    let widths: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .chain(std::iter::once(&header))
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    std::iter::once(&header)
        .chain(&rows)
        .map(|r| {
            format!(
                "{:<w0$}  {:<w1$}  {}\n",
                r[0],
                r[1],
                r[2],
                w0 = widths[0],
                w1 = widths[1]
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(domain: &str, source: DomainSource) -> DomainEntry {
        DomainEntry {
            domain: domain.into(),
            source,
            certificate: None,
        }
    }

    #[test]
    fn names_are_lowercased_without_the_final_dot() {
        assert_eq!(
            normalise(" Shop.Example.COM. ").unwrap(),
            "shop.example.com"
        );
        assert!(normalise(".").is_err());
    }

    #[test]
    fn the_list_adds_the_cluster_name_beacon_serves_once() {
        let mut domains = Domains {
            app: "shop".into(),
            domains: vec![
                entry("shop.example.com", DomainSource::Manifest),
                entry("www.example.com", DomainSource::Added),
            ],
        };
        add_served(
            &mut domains,
            &[
                "shop.example.com".into(),
                "www.example.com".into(),
                "shop.apps.example.net".into(),
            ],
        );
        assert_eq!(
            table(&domains),
            "DOMAIN                 SOURCE    CERTIFICATE\n\
             shop.example.com       manifest  -\n\
             www.example.com        added     -\n\
             shop.apps.example.net  cluster   -\n"
        );
    }
}

//! `em domains`: the host names an app is served on. Adding and removing go through apprepo
//! (`/v1/apps/{app}/domains`, no release); `list` joins apprepo's names (manifest, added) with
//! what Beacon serves the app on, which adds `<app>.<cluster domain>`, and with the state of
//! each name's certificate from ACME (apprepo's `/v1/acme/certs`).

use px_proto::acme::AcmeCertSummary;
use px_proto::api::{AddDomain, DomainCertificate, DomainEntry, DomainSource, Domains};

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
            // Without ACME (or an apprepo that predates it) the column stays empty.
            let certs: Vec<AcmeCertSummary> = client
                .get(&client.repo("/v1/acme/certs"))
                .await
                .unwrap_or_default();
            add_certificates(&mut domains, &certs);
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

/// Each name's certificate, when ACME holds a record of it.
fn add_certificates(domains: &mut Domains, certs: &[AcmeCertSummary]) {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    for entry in &mut domains.domains {
        if let Some(cert) = certs
            .iter()
            .find(|c| c.domain.eq_ignore_ascii_case(&entry.domain))
        {
            entry.certificate = Some(DomainCertificate {
                state: cert.state.as_str().to_string(),
                issuer: some(&cert.issuer),
                not_after: some(&cert.not_after),
                last_error: some(&cert.last_error),
            });
        }
    }
}

/// The names as aligned columns (`shop.example.com  added  issued  2027-03-01  R11`), then
/// the CA's reason for each certificate whose last order failed.
fn table(domains: &Domains) -> String {
    if domains.domains.is_empty() {
        return format!(
            "{} has no host names yet; `em domains add NAME`, or deploy it\n",
            domains.app
        );
    }
    let dash = || "-".to_string();
    let rows: Vec<[String; 5]> = domains
        .domains
        .iter()
        .map(|e| {
            let cert = e.certificate.as_ref();
            [
                e.domain.clone(),
                e.source.as_str().to_string(),
                cert.map_or_else(dash, |c| c.state.clone()),
                // The date of an RFC 3339 time is enough to plan by.
                cert.and_then(|c| c.not_after.as_deref())
                    .map_or_else(dash, |t| t.chars().take(10).collect()),
                cert.and_then(|c| c.issuer.clone()).unwrap_or_else(dash),
            ]
        })
        .collect();
    let header = [
        "DOMAIN".to_string(),
        "SOURCE".into(),
        "CERTIFICATE".into(),
        "EXPIRES".into(),
        "ISSUER".into(),
    ];
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .chain(std::iter::once(&header))
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text: String = std::iter::once(&header)
        .chain(&rows)
        .map(|r| {
            format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}\n",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3]
            )
        })
        .collect();
    for e in &domains.domains {
        if let Some(reason) = e.certificate.as_ref().and_then(|c| c.last_error.as_deref()) {
            text.push_str(&format!(
                "{}: the last order failed: {}\n",
                e.domain,
                crate::safe_text::line(reason)
            ));
        }
    }
    text
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
            "DOMAIN                 SOURCE    CERTIFICATE  EXPIRES  ISSUER\n\
             shop.example.com       manifest  -            -        -\n\
             www.example.com        added     -            -        -\n\
             shop.apps.example.net  cluster   -            -        -\n"
        );
    }

    #[test]
    fn the_list_shows_each_certificate_with_its_expiry_issuer_and_the_cas_reason() {
        let mut domains = Domains {
            app: "shop".into(),
            domains: vec![
                entry("shop.example.com", DomainSource::Manifest),
                entry("www.example.com", DomainSource::Added),
                entry("new.example.com", DomainSource::Added),
            ],
        };
        let cert =
            |domain: &str, state, not_after: &str, issuer: &str, error: &str| AcmeCertSummary {
                domain: domain.into(),
                state,
                issuer: issuer.into(),
                not_after: not_after.into(),
                last_error: error.into(),
            };
        add_certificates(
            &mut domains,
            &[
                cert(
                    "Shop.Example.com",
                    px_proto::acme::CertState::Issued,
                    "2027-03-01T10:00:00Z",
                    "R11",
                    "",
                ),
                cert(
                    "www.example.com",
                    px_proto::acme::CertState::Failed,
                    "",
                    "",
                    "DNS problem: NXDOMAIN looking up A for www.example.com\x1b[2J",
                ),
                cert(
                    "other.example.org",
                    px_proto::acme::CertState::Issued,
                    "2027-01-01T00:00:00Z",
                    "R10",
                    "",
                ),
            ],
        );
        assert_eq!(
            table(&domains),
            "DOMAIN            SOURCE    CERTIFICATE  EXPIRES     ISSUER\n\
             shop.example.com  manifest  issued       2027-03-01  R11\n\
             www.example.com   added     failed       -           -\n\
             new.example.com   added     -            -           -\n\
             www.example.com: the last order failed: DNS problem: NXDOMAIN looking up A for www.example.com\\x1b[2J\n"
        );
    }
}

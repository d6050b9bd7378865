//! Certificates from ACME for every host name an app serves (docs/src/design/acme.md). One
//! task ([`run`]) owns the work: it loads or creates the account (kept in apprepo), watches the
//! host names the hub routes, orders a certificate for each one that has none (or is due for
//! renewal), a bounded number at a time and one at a time per name, publishes each order's
//! challenge to every Maestro, and stores what the CA issued in apprepo, where every Maestro
//! fetches it. A name no longer routed (its app deleted, the name removed) is neither ordered
//! nor renewed, and drops out of the set the Maestros serve.
//!
//! - `client.rs`: the HTTPS client the ACME library uses;
//! - `store.rs`: the account and certificate records in apprepo;
//! - `order.rs`: one order, from challenge to certificate;
//! - `challenges.rs`: the challenge set sent to every Maestro link;
//! - `budget.rs`: the CA's rate limits, mirrored locally;
//! - `renewal.rs`: when to renew, and when a certificate is close to expiry.

pub(crate) mod budget;
mod challenges;
mod client;
mod order;
mod renewal;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{Account, AccountCredentials, NewAccount};
use px_proto::acme::{
    AcmeAccount, AcmeCert, AcmeCertVersions, CertState, CertVersion, MAX_ACME_ERROR_LEN,
};
use px_proto::beacon::EventKind;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::budget::Budget;
pub(crate) use self::challenges::Challenges;
use self::client::CaClient;
use self::order::{Issued, OrderError, OrderSpec};
pub(crate) use self::store::Store;
use crate::alerts::{Alert, Alerter};
use crate::config::ChallengeKind;
use crate::events::EventDraft;
use crate::hub::Hub;

/// Orders in flight at once, across all names: enough to get a new cluster's names issued
/// in a few minutes, few enough that the CA sees no burst.
pub(crate) const MAX_ORDERS_IN_FLIGHT: usize = 4;
/// How often the routed names are compared with the certificates held: cheap (it reads
/// apprepo only for names not seen before), and a new app's name is ordered within it.
const TICK: Duration = Duration::from_secs(1);
/// Waits between attempts at loading or creating the account while the CA or apprepo is away,
/// and before reading apprepo's records again after a read failed (so a wrong token or an
/// apprepo away is logged every few seconds, not on every pass).
const ACCOUNT_RETRY: Duration = Duration::from_secs(10);
/// How long Maestros get to take up a published challenge before the CA checks it: a link
/// frame arrives in milliseconds; this leaves room for a loaded node.
pub(crate) const DEFAULT_PUBLISH_DELAY: Duration = Duration::from_millis(500);

/// What `[acme]` configures, checked.
pub(crate) struct AcmeSettings {
    pub(crate) directory_url: String,
    /// apprepo's base URL, for the certificate URLs Maestros fetch from.
    pub(crate) repository_url: String,
    pub(crate) email: Option<String>,
    pub(crate) challenge: ChallengeKind,
    pub(crate) profile: Option<String>,
    /// Trust for the CA's certificate (`acme.ca_file`); `None`: the system's roots.
    pub(crate) ca_tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) limits: budget::Limits,
    pub(crate) publish_delay: Duration,
    /// The wait after a second failed order in a row (`acme.retry_after_failure`; the first
    /// waits at most a minute), doubled for each further one (`renewal::retry_after`).
    pub(crate) retry_after_failure: Duration,
}

/// Host names no public CA issues for (RFC 6761's `localhost`, single labels): never ordered.
pub(crate) fn orderable(domain: &str) -> bool {
    domain.contains('.') && domain != "localhost" && !domain.ends_with(".localhost")
}

/// What one order task hands back.
struct Finished {
    domain: String,
    previous: Option<AcmeCert>,
    result: Result<Issued, OrderError>,
}

/// The ACME task's state.
struct Manager {
    settings: AcmeSettings,
    store: Store,
    hub: Arc<Hub>,
    challenges: Challenges,
    alerter: Alerter,
    account: Account,
    /// Each name's record as last read from or written to apprepo (`None`: none stored).
    known: BTreeMap<String, Option<AcmeCert>>,
    in_flight: BTreeSet<String>,
    budget: Budget,
    /// Names warned about as close to expiry, with the serial warned about: once each.
    warned: BTreeSet<(String, String)>,
    /// No record is read from apprepo before this, after a read failed.
    reads_paused_until: Option<Instant>,
    /// Failed orders in a row per name, for the back-off; forgotten on issue (and by a
    /// restarted Beacon, which starts at the first wait again).
    failures: BTreeMap<String, u32>,
    /// The routed names as of the last pass.
    served: Arc<BTreeSet<String>>,
    /// Whether the last pass read the record of every routed name: only then is the set of
    /// certificates announced, since a Maestro drops the certificates a set does not name.
    complete: bool,
}

/// Runs until `shutdown`: loads or creates the account, then keeps a certificate for every
/// routed name.
pub(crate) async fn run(
    settings: AcmeSettings,
    store: Store,
    hub: Arc<Hub>,
    challenges: Challenges,
    alerter: Alerter,
    shutdown: CancellationToken,
) {
    let account = loop {
        match account(&settings, &store).await {
            Ok(account) => break account,
            Err(e) => {
                tracing::warn!(error = %e, "acme: no account yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCOUNT_RETRY) => {}
                }
            }
        }
    };
    tracing::info!(directory = %settings.directory_url, "acme: account ready");
    let mut manager = Manager {
        budget: Budget::new(settings.limits),
        settings,
        store,
        hub,
        challenges,
        alerter,
        account,
        known: BTreeMap::new(),
        in_flight: BTreeSet::new(),
        warned: BTreeSet::new(),
        reads_paused_until: None,
        failures: BTreeMap::new(),
        served: Arc::new(BTreeSet::new()),
        complete: false,
    };
    let mut orders: JoinSet<Finished> = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => manager.pass(&mut orders).await,
            Some(done) = orders.join_next() => match done {
                Ok(finished) => manager.finished(finished).await,
                Err(e) => tracing::error!(error = %e, "acme: an order task panicked"),
            },
        }
    }
}

/// The stored account, or a new one stored for every Beacon after.
async fn account(settings: &AcmeSettings, store: &Store) -> Result<Account, String> {
    let http = || -> Result<Box<dyn instant_acme::HttpClient>, String> {
        Ok(Box::new(CaClient::new(settings.ca_tls.clone())?))
    };
    if let Some(stored) = store.account().await? {
        return from_stored(settings, stored, http()?).await;
    }
    let contact = settings.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(http()?)
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory_url.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating an account at {}: {e}", settings.directory_url))?;
    let record = AcmeAccount {
        directory_url: settings.directory_url.clone(),
        credentials: serde_json::to_value(&credentials).map_err(|e| e.to_string())?,
    };
    if store.create_account(&record).await? {
        tracing::info!(id = %account.id(), "acme: account created and stored in apprepo");
        return Ok(account);
    }
    // Another Beacon stored one first: use that one, so the cluster has one account.
    let stored = store
        .account()
        .await?
        .ok_or("apprepo refused the account as stored already, then had none")?;
    from_stored(settings, stored, http()?).await
}

async fn from_stored(
    settings: &AcmeSettings,
    stored: AcmeAccount,
    http: Box<dyn instant_acme::HttpClient>,
) -> Result<Account, String> {
    if stored.directory_url != settings.directory_url {
        return Err(format!(
            "apprepo holds an account at {}, not at acme.directory_url {}; an account is valid at its own CA only (set directory_url back, or remove acme/account.json from apprepo's storage to create one at the new CA)",
            stored.directory_url, settings.directory_url
        ));
    }
    let credentials: AccountCredentials = serde_json::from_value(stored.credentials)
        .map_err(|e| format!("acme/account.json does not hold account credentials: {e}"))?;
    Account::builder_with_http(http)
        .from_credentials(credentials)
        .await
        .map_err(|e| {
            format!(
                "loading the stored account at {}: {e}",
                stored.directory_url
            )
        })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// Cuts a message to what a record keeps, at a character boundary.
fn cut(message: &str) -> String {
    let mut end = message.len().min(MAX_ACME_ERROR_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

impl Manager {
    /// One pass over the routed names: read what is new, warn of expiry, start what is due.
    async fn pass(&mut self, orders: &mut JoinSet<Finished>) {
        // Before the desired state is read, no name is known to be routed or not.
        let Some(served) = self.hub.served_domains() else {
            return;
        };
        let now = SystemTime::now();
        let mut complete = true;
        // What Beacon knew of names no longer routed is forgotten: they are not renewed, and
        // the next announcement leaves them out.
        self.known.retain(|domain, _| served.contains(domain));
        self.failures.retain(|domain, _| served.contains(domain));
        self.warned.retain(|(domain, _)| served.contains(domain));
        self.served = served.clone();
        for domain in served.iter().cloned() {
            if !orderable(&domain) {
                continue;
            }
            if !self.known.contains_key(&domain) {
                if self
                    .reads_paused_until
                    .is_some_and(|until| Instant::now() < until)
                {
                    complete = false;
                    continue;
                }
                match self.store.cert(&domain).await {
                    Ok(record) => {
                        self.known.insert(domain.clone(), record);
                    }
                    Err(e) => {
                        tracing::warn!(%domain, error = %e, "acme: cannot read the stored certificate; retrying in {ACCOUNT_RETRY:?}");
                        self.reads_paused_until = Some(Instant::now() + ACCOUNT_RETRY);
                        complete = false;
                        continue;
                    }
                }
            }
            let record = self.known.get(&domain).cloned().flatten();
            if let Some(record) = &record {
                self.warn_if_expiring(record, now);
            }
            if self.in_flight.contains(&domain)
                || self.in_flight.len() >= MAX_ORDERS_IN_FLIGHT
                || !renewal::due(record.as_ref(), now)
            {
                continue;
            }
            if let Err(refusal) = self.budget.take_order(&domain, Instant::now()) {
                let message =
                    format!("refused by the local budget before asking the CA: {refusal}");
                self.failed(&domain, record, &message).await;
                continue;
            }
            self.start(orders, domain, record).await;
        }
        self.complete = complete;
        self.announce();
    }

    /// Names every held certificate of a routed name to the Maestro links (sent only when the
    /// set changed, and only once every routed name's record was read).
    fn announce(&self) {
        if !self.complete {
            return;
        }
        let base = self.settings.repository_url.trim_end_matches('/');
        let certs = self
            .known
            .iter()
            .filter(|(domain, _)| self.served.contains(*domain))
            .filter_map(|(domain, record)| {
                let record = record.as_ref().filter(|r| !r.chain_pem.is_empty())?;
                Some((
                    domain.clone(),
                    CertVersion {
                        serial: record.serial.clone(),
                        url: format!("{base}/v1/acme/certs/{domain}"),
                    },
                ))
            })
            .collect();
        self.challenges.set_certs(AcmeCertVersions { certs });
    }

    async fn start(
        &mut self,
        orders: &mut JoinSet<Finished>,
        domain: String,
        previous: Option<AcmeCert>,
    ) {
        tracing::info!(%domain, renewal = previous.as_ref().is_some_and(|p| !p.chain_pem.is_empty()), "acme: ordering a certificate");
        if previous.is_none() {
            let pending = AcmeCert {
                domain: domain.clone(),
                state: CertState::Pending,
                chain_pem: String::new(),
                key_pem: String::new(),
                issuer: String::new(),
                not_before: String::new(),
                not_after: String::new(),
                renew_at: String::new(),
                last_error: String::new(),
                serial: String::new(),
            };
            if let Err(e) = self.store.put_cert(&pending).await {
                tracing::warn!(%domain, error = %e, "acme: cannot record the pending order");
            }
        }
        self.in_flight.insert(domain.clone());
        let account = self.account.clone();
        let challenges = self.challenges.clone();
        let challenge = self.settings.challenge;
        let profile = self.settings.profile.clone();
        let publish_delay = self.settings.publish_delay;
        // A renewal names the certificate it replaces where the CA offers renewal information.
        let replaces = previous
            .as_ref()
            .filter(|p| !p.chain_pem.is_empty())
            .and_then(|p| order::certificate_id(&p.chain_pem));
        orders.spawn(async move {
            let spec = OrderSpec {
                domain: &domain,
                challenge,
                profile: profile.as_deref(),
                replaces,
                publish_delay,
            };
            let mut result = order::order(&account, &challenges, spec).await;
            // A CA without renewal information refuses `replaces`: order again without it.
            if matches!(&result, Err(OrderError::Unsupported(_))) {
                let spec = OrderSpec {
                    domain: &domain,
                    challenge,
                    profile: profile.as_deref(),
                    replaces: None,
                    publish_delay,
                };
                result = order::order(&account, &challenges, spec).await;
            }
            Finished {
                domain,
                previous,
                result,
            }
        });
    }

    async fn finished(&mut self, finished: Finished) {
        let Finished {
            domain,
            previous,
            result,
        } = finished;
        self.in_flight.remove(&domain);
        match result {
            Ok(issued) => self.issued(&domain, issued).await,
            Err(e) => {
                if matches!(e, OrderError::Ca(_)) {
                    self.budget.failed(&domain, Instant::now());
                }
                self.failed(&domain, previous, &e.to_string()).await;
            }
        }
    }

    async fn issued(&mut self, domain: &str, issued: Issued) {
        self.budget.issued(domain, Instant::now());
        self.failures.remove(domain);
        let renew_at = renewal::renew_at(&self.account, &issued).await;
        let record = AcmeCert {
            domain: domain.to_string(),
            state: CertState::Issued,
            issuer: issued.issuer.clone(),
            not_before: rfc3339(issued.not_before),
            not_after: rfc3339(issued.not_after),
            renew_at: rfc3339(renew_at),
            last_error: String::new(),
            serial: issued.serial.clone(),
            chain_pem: issued.chain_pem,
            key_pem: issued.key_pem,
        };
        if let Err(e) = self.store.put_cert(&record).await {
            // Not stored, not served: order again at the next pass rather than lose it.
            tracing::error!(%domain, error = %e, "acme: the issued certificate could not be stored; ordering again");
            self.known.remove(domain);
            return;
        }
        tracing::info!(%domain, not_after = %record.not_after, renew_at = %record.renew_at, "acme: certificate issued");
        self.hub.events().record(EventDraft {
            kind: EventKind::CertificateIssued,
            node: None,
            app: None,
            release: None,
            message: format!(
                "certificate for {domain} issued by {}, valid until {}",
                record.issuer, record.not_after
            ),
            detail: None,
            level: None,
            failure: None,
            build: None,
        });
        self.known.insert(domain.to_string(), Some(record));
        self.announce();
    }

    /// Records a failed (or refused) order: the previous certificate, if any, is kept and
    /// still served; the reason becomes an event and an alert; the name is tried again later.
    async fn failed(&mut self, domain: &str, previous: Option<AcmeCert>, reason: &str) {
        let now = SystemTime::now();
        let failures = self.failures.entry(domain.to_string()).or_default();
        *failures = failures.saturating_add(1);
        let in_use = previous
            .as_ref()
            .filter(|p| !p.chain_pem.is_empty())
            .and_then(|p| parse_time(&p.not_after));
        let retry =
            now + renewal::retry_after(self.settings.retry_after_failure, *failures, in_use, now);
        let mut record = previous.unwrap_or_else(|| AcmeCert {
            domain: domain.to_string(),
            state: CertState::Failed,
            chain_pem: String::new(),
            key_pem: String::new(),
            issuer: String::new(),
            not_before: String::new(),
            not_after: String::new(),
            renew_at: String::new(),
            last_error: String::new(),
            serial: String::new(),
        });
        record.state = CertState::Failed;
        record.last_error = cut(reason);
        record.renew_at = rfc3339(retry);
        if let Err(e) = self.store.put_cert(&record).await {
            tracing::warn!(%domain, error = %e, "acme: cannot record the failure");
        }
        tracing::warn!(%domain, reason, "acme: order failed");
        let event = self.hub.events().record(EventDraft {
            kind: EventKind::CertificateFailed,
            node: None,
            app: None,
            release: None,
            message: format!(
                "certificate for {domain} not issued; retrying at {}",
                record.renew_at
            ),
            detail: Some(record.last_error.clone()),
            level: None,
            failure: None,
            build: None,
        });
        self.alerter.raise(Alert {
            key: format!("certificate_failed:{domain}"),
            text: format!("certificate for {domain} not issued: {}", record.last_error),
            event,
        });
        self.known.insert(domain.to_string(), Some(record));
    }

    /// Raises an alert, once per certificate, when it is close to expiry.
    fn warn_if_expiring(&mut self, record: &AcmeCert, now: SystemTime) {
        if record.chain_pem.is_empty() {
            return;
        }
        let (Some(not_before), Some(not_after)) = (
            parse_time(&record.not_before),
            parse_time(&record.not_after),
        ) else {
            return;
        };
        if !renewal::expiring(not_before, not_after, now) {
            return;
        }
        if !self
            .warned
            .insert((record.domain.clone(), record.serial.clone()))
        {
            return;
        }
        let event = self.hub.events().record(EventDraft {
            kind: EventKind::CertificateExpiring,
            node: None,
            app: None,
            release: None,
            message: format!(
                "certificate for {} expires at {} and is not renewed yet",
                record.domain, record.not_after
            ),
            detail: (!record.last_error.is_empty()).then(|| record.last_error.clone()),
            level: None,
            failure: None,
            build: None,
        });
        self.alerter.raise(Alert {
            key: format!("certificate_expiring:{}", record.domain),
            text: event.message.clone(),
            event,
        });
    }
}

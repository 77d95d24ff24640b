//! The webhook sender: delivers the outbox (`db::webhooks`) at least once, signed per the
//! Standard Webhooks spec, with retries and backoff. It runs beside the job workers in every
//! `serve` and `worker` process and never holds up a job: a receiver that is failing or down
//! only delays its own deliveries, and a slow one the others of its batch by at most the
//! 10 s request timeout.
//!
//! Headers: `webhook-id` (the delivery's `msg_…`, the same on every attempt, for the receiver's
//! de-duplication), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`:
//! `v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`, keyed with each configured
//! secret (several, space-separated, while a secret is being rotated).

use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::db::webhooks::{self, Delivery};
use crate::db::Db;
use crate::ids::now_micros;

/// A signing secret: `whsec_` + base64 of the key bytes (the Standard Webhooks form), or any
/// other string, whose UTF-8 bytes are the key.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// Parses one secret.
    pub fn parse(s: &str) -> Result<Secret, String> {
        match s.strip_prefix("whsec_") {
            Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(key) if key.len() >= 16 => Ok(Secret(key)),
                Ok(_) => Err("a whsec_ secret needs at least 16 bytes of key".into()),
                Err(e) => Err(format!("a whsec_ secret must be base64: {e}")),
            },
            None if s.len() >= 16 => Ok(Secret(s.as_bytes().to_vec())),
            None => Err("a webhook secret needs at least 16 characters".into()),
        }
    }

    /// Parses `WHITTLE_WEBHOOK_SECRET`: one secret, or several separated by spaces or commas
    /// (the first is the current one; all sign while receivers move over).
    pub fn parse_list(s: &str) -> Result<Vec<Secret>, String> {
        let secrets: Vec<Secret> = s
            .split([' ', ','])
            .filter(|p| !p.is_empty())
            .map(Secret::parse)
            .collect::<Result<_, _>>()?;
        if secrets.is_empty() {
            return Err("WHITTLE_WEBHOOK_SECRET is empty".into());
        }
        Ok(secrets)
    }

    /// `v1,` + base64(HMAC-SHA256(key, `{id}.{timestamp}.{body}`)).
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Whether `ip` is an address on the public internet: not loopback, private (RFC 1918,
/// unique-local), link-local (cloud metadata lives there), carrier-grade NAT, unspecified,
/// broadcast or multicast. Receivers at other addresses are refused unless allowed
/// (`WHITTLE_WEBHOOK_ALLOW_PRIVATE`): a tenant must not make the server call its own
/// network and read the answers in `GET /v1/jobs/{id}/deliveries`.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            // Addresses that carry an IPv4 one: mapped, compatible, NAT64, 6to4.
            if let Some(v4) = v6.to_ipv4() {
                return !v6.is_loopback() && !v6.is_unspecified() && is_public(IpAddr::V4(v4));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(IpAddr::V4(embedded(s[6], s[7])));
            }
            if s[0] == 0x2002 {
                return is_public(IpAddr::V4(embedded(s[1], s[2])));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The settings of every request to a receiver: a 10 s timeout, no redirects, and no proxy
/// (a proxy would resolve the host itself, around the address check).
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("whittle-webhooks/", env!("CARGO_PKG_VERSION")))
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
}

/// Why a receiver was not called.
enum Refusal {
    /// It may not be called at all (a non-public address): the delivery fails at once.
    Forbidden(String),
    /// Not now (the name did not resolve): retried with the backoff.
    Transient(String),
}

/// Delivers due webhooks.
#[derive(Debug, Clone)]
pub struct Sender {
    db: Db,
    http: reqwest::Client,
    secrets: Vec<Secret>,
    allow_private: bool,
}

/// How long a claimed delivery is held before another sender may retry it.
const CLAIM_MICROS: i64 = 60_000_000;

impl Sender {
    /// A sender signing with `secrets` (the first is current); receivers at non-public
    /// addresses are refused unless `allow_private`.
    pub fn new(db: Db, secrets: Vec<Secret>, allow_private: bool) -> Sender {
        let http = client_builder()
            .build()
            .expect("a client with rustls builds");
        Sender {
            db,
            http,
            secrets,
            allow_private,
        }
    }

    /// The client to reach `url` with: refused (with the reason) when its host resolves to a
    /// non-public address and those are not allowed; otherwise pinned to the address checked,
    /// so a DNS answer that changes in between cannot redirect the request.
    async fn client_for(&self, url: &str) -> Result<reqwest::Client, Refusal> {
        if self.allow_private {
            return Ok(self.http.clone());
        }
        let parsed =
            url::Url::parse(url).map_err(|e| Refusal::Forbidden(format!("invalid URL: {e}")))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| Refusal::Forbidden("the URL has no host".into()))?
            .to_string();
        let port = parsed.port_or_known_default().unwrap_or(80);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        // A resolver that fails or hangs is a passing trouble: retried like a failed send.
        let lookup = tokio::net::lookup_host((bare, port));
        let addrs: Vec<std::net::SocketAddr> =
            match tokio::time::timeout(Duration::from_secs(5), lookup).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err(Refusal::Transient(format!("resolving {host}: {e}"))),
                Err(_) => return Err(Refusal::Transient(format!("resolving {host}: timed out"))),
            };
        let Some(first) = addrs.first().copied() else {
            return Err(Refusal::Transient(format!("{host} resolves to no address")));
        };
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(Refusal::Forbidden(format!(
                "refused: {host} resolves to {}, not a public address (WHITTLE_WEBHOOK_ALLOW_PRIVATE=true allows it)",
                bad.ip()
            )));
        }
        if bare.parse::<std::net::IpAddr>().is_ok() {
            return Ok(self.http.clone());
        }
        client_builder()
            .resolve(&host, first)
            .build()
            .map_err(|e| Refusal::Transient(e.to_string()))
    }

    /// Sends every delivery due at `now` (concurrently, at most 16 at a time); how many
    /// were attempted.
    pub async fn deliver_due(&self, now: i64) -> crate::db::Result<usize> {
        let due = webhooks::claim_due(&self.db, now, CLAIM_MICROS, 16).await?;
        let n = due.len();
        let sends = due.into_iter().map(|d| self.send(d));
        for r in futures_util::future::join_all(sends).await {
            r?;
        }
        Ok(n)
    }

    async fn send(&self, d: Delivery) -> crate::db::Result<()> {
        let timestamp = now_micros() / 1_000_000;
        let signature = self
            .secrets
            .iter()
            .map(|s| s.sign(&d.id, timestamp, &d.payload))
            .collect::<Vec<_>>()
            .join(" ");
        let client = match self.client_for(&d.url).await {
            Ok(c) => c,
            Err(refusal) => {
                let (reason, give_up) = match refusal {
                    Refusal::Forbidden(r) => (r, true),
                    Refusal::Transient(r) => (r, false),
                };
                warn!(delivery = %d.id, job_id = %d.job_id, %reason, give_up, "webhook not sent");
                let attempt = webhooks::Attempt {
                    at: now_micros(),
                    error: Some(reason),
                    give_up,
                    ..Default::default()
                };
                return webhooks::record_attempt(&self.db, &d, attempt).await;
            }
        };
        let started = Instant::now();
        let res = client
            .post(&d.url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(d.payload.clone())
            .send()
            .await;
        let (status, error, body) = match res {
            Ok(mut r) => {
                let status = r.status().as_u16();
                // The first KiB is kept; more is never read (a receiver could send gigabytes).
                let mut kept = Vec::new();
                while kept.len() < 1024 {
                    match r.chunk().await {
                        Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                kept.truncate(1024);
                let body = String::from_utf8_lossy(&kept)
                    .trim_end_matches('\u{fffd}')
                    .to_string();
                (Some(status), None, body)
            }
            Err(e) => (None, Some(e.to_string()), String::new()),
        };
        let ms = started.elapsed().as_millis() as u64;
        match status {
            Some(s) if (200..300).contains(&s) => {
                info!(delivery = %d.id, job_id = %d.job_id, event = %d.event_type, status = s, "webhook delivered");
            }
            _ => {
                warn!(delivery = %d.id, job_id = %d.job_id, event = %d.event_type, ?status, ?error, attempt = d.attempts + 1, "webhook delivery failed; it will be retried")
            }
        }
        metrics::counter!("whittle_webhook_attempts_total", "outcome" => if status.is_some_and(|s| (200..300).contains(&s)) { "delivered" } else { "failed" }).increment(1);
        let attempt = webhooks::Attempt {
            at: now_micros(),
            status,
            error,
            duration_ms: ms,
            body,
            give_up: false,
        };
        webhooks::record_attempt(&self.db, &d, attempt).await
    }

    /// Delivers until `shutdown`, looking for due deliveries every `interval`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.deliver_due(now_micros()).await {
                warn!(error = %e, "webhook sender: reading the outbox failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

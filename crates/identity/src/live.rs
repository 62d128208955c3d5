//! The identity in force, as one value that producers publish and the TLS acceptor reads.
//!
//! One source of identity, two producers: the files named in the config ([`crate::files`])
//! and the SPIFFE Workload API both turn what they read into an [`IdentitySnapshot`], build a
//! [`LiveIdentity`] from it and publish it through a `tokio::sync::watch` channel. The
//! acceptor takes the latest value for each new handshake, so new connections get the new
//! pair and bundles while established ones finish on the config they were accepted with. The
//! handshake code never knows where identity came from.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bundle::TrustBundles;
use crate::server::{ServerIdentity, ServerIdentityError, crypto_provider, server_config};
use crate::serving::{self, ServingProblem};
use crate::svid::ServingLeaf;

/// Everything identity is made of: this workload's SVID and key, and the roots of every
/// accepted trust domain.
#[derive(Debug, Clone)]
pub struct IdentitySnapshot {
    pub identity: ServerIdentity,
    pub bundles: TrustBundles,
}

/// A certificate whose expiry is exported as `portcullis_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// `serving` (this workload's SVID) or `bundle:<trust domain>`.
    pub kind: String,
    pub subject: String,
    /// The serving SVID's SPIFFE ID, or `spiffe://<trust domain>` for a bundle root: SVIDs
    /// often have an empty subject, so this is the label that tells them apart.
    pub spiffe_id: String,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

/// A snapshot made usable: the rustls config built from it, and what readiness and the
/// metrics need to know about it.
#[derive(Debug)]
pub struct LiveIdentity {
    pub tls: Arc<ServerConfig>,
    /// The same SVID and key as a client certificate: what the sidecar presents when it
    /// authenticates itself (RFC 8705 mTLS client authentication to a token service).
    pub client_key: Arc<rustls::sign::CertifiedKey>,
    pub serving: ServingLeaf,
    pub certificates: Vec<CertificateExpiry>,
    /// The trust domains whose callers can be accepted: those whose bundle holds a root.
    pub trust_domains: Vec<String>,
    /// What [`Self::readiness`] judges the serving chain with, at the time it is asked.
    chain: ServingChain,
}

/// The serving chain as presented and the bundles it must chain to, kept so that readiness
/// re-runs [`serving::check_chain`] at each probe. A verdict taken when the identity was
/// built would go stale: an intermediate (or root) that expires before the leaf breaks the
/// chain later, with no file changed. Re-running the check rather than precomputing the
/// verified path's validity window keeps one definition of "chains" (webpki's path building,
/// alternative paths included); it costs a few signature checks per probe, and probes come
/// seconds apart.
#[derive(Debug)]
struct ServingChain {
    certs: Vec<CertificateDer<'static>>,
    bundles: TrustBundles,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, thiserror::Error)]
pub enum LiveIdentityError {
    #[error(transparent)]
    Serving(#[from] ServingProblem),
    #[error(transparent)]
    Tls(#[from] ServerIdentityError),
    #[error("serving key as a client certificate: {0}")]
    Client(String),
}

impl LiveIdentity {
    /// Checks the pair (an X509-SVID and its key) and builds the server config. A chain that
    /// does not verify is not refused, only reported by [`Self::readiness`]: refusing it would
    /// keep the old bundles, and a removed root must stop being trusted at once.
    pub fn build(snapshot: IdentitySnapshot) -> Result<Self, LiveIdentityError> {
        let provider = crypto_provider();
        let serving = serving::check_pair(&snapshot.identity, &provider)?;
        let mut certificates = Vec::new();
        if let Some((subject, not_after)) = snapshot
            .identity
            .cert_chain
            .first()
            .and_then(|leaf| crate::bundle::subject_and_expiry(leaf))
        {
            certificates.push(CertificateExpiry {
                kind: "serving".to_owned(),
                subject,
                spiffe_id: serving.id.to_string(),
                not_after,
            });
        }
        let mut trust_domains = Vec::new();
        for (domain, bundle) in snapshot.bundles.iter() {
            if !bundle.roots.is_empty() {
                trust_domains.push(domain.to_string());
            }
            for (subject, not_after) in &bundle.expiries {
                certificates.push(CertificateExpiry {
                    kind: format!("bundle:{domain}"),
                    subject: subject.clone(),
                    spiffe_id: format!("spiffe://{domain}"),
                    not_after: *not_after,
                });
            }
        }
        let client_key = Arc::new(
            rustls::sign::CertifiedKey::from_der(
                snapshot.identity.cert_chain.clone(),
                snapshot.identity.key.clone_key(),
                &provider,
            )
            .map_err(|e| LiveIdentityError::Client(e.to_string()))?,
        );
        let chain = ServingChain {
            certs: snapshot.identity.cert_chain.clone(),
            bundles: snapshot.bundles.clone(),
            provider,
        };
        let tls = server_config(snapshot.identity, &snapshot.bundles)?;
        Ok(Self {
            tls,
            client_key,
            serving,
            certificates,
            trust_domains,
            chain,
        })
    }

    /// Whether this identity can serve at `now`: the SVID is within its validity window and
    /// chains to its own trust domain's bundle at `now`.
    pub fn readiness(&self, now: SystemTime) -> Result<(), ServingProblem> {
        serving::check_validity(&self.serving, now)?;
        self.chain_at(now)
    }

    /// Whether the serving chain verifies against its own trust domain's bundle at `now`
    /// (every certificate of the path, root included, valid then). Serving goes on when it
    /// does not (the bundle may be mid-rotation), but the sidecar is not ready.
    pub fn chain_at(&self, now: SystemTime) -> Result<(), ServingProblem> {
        serving::check_chain(
            &self.chain.certs,
            &self.serving,
            &self.chain.bundles,
            &self.chain.provider,
            now,
        )
    }
}

/// What a reload was about: the serving pair or a trust bundle (the `kind` label of
/// `portcullis_certificate_reloads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
    Serving,
    Bundle,
    /// A full-state update from the SPIFFE Workload API (SVID and bundles together).
    WorkloadApi,
}

impl ReloadKind {
    pub fn label(self) -> &'static str {
        match self {
            ReloadKind::Serving => "serving",
            ReloadKind::Bundle => "bundle",
            ReloadKind::WorkloadApi => "workload_api",
        }
    }
}

/// Told of every reload outcome; the proxy's metrics implement it.
pub trait ReloadObserver: Send + Sync + std::fmt::Debug {
    fn reloaded(&self, kind: ReloadKind, success: bool);
}

/// Starts the task that keeps an identity current; given the observer to report to.
pub type Producer = Box<dyn FnOnce(Arc<dyn ReloadObserver>) -> JoinHandle<()> + Send>;

/// The identity channel the proxy consumes: the value in force now, and (for a live source)
/// the producer that will publish the next ones, started once the proxy can count reloads.
pub struct IdentityFeed {
    pub current: watch::Receiver<Arc<LiveIdentity>>,
    pub producer: Option<Producer>,
}

impl std::fmt::Debug for IdentityFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityFeed")
            .field("current", &self.current.borrow().serving.id)
            .field("live", &self.producer.is_some())
            .finish()
    }
}

impl IdentityFeed {
    /// An identity that never changes (tests, `demo`).
    pub fn fixed(identity: LiveIdentity) -> Self {
        let (sender, current) = watch::channel(Arc::new(identity));
        // The sender is dropped: receivers keep the last value for ever.
        drop(sender);
        Self {
            current,
            producer: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use portcullis_core::TrustDomain;
    use portcullis_test_support::pki::{Ca, LeafSpec};
    use time::OffsetDateTime;

    use super::{IdentitySnapshot, LiveIdentity};
    use crate::bundle::{TrustBundles, parse_bundle};
    use crate::server::ServerIdentity;
    use crate::serving::ServingProblem;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const TRUST_DOMAIN: &str = "td.example";
    const DAY: Duration = Duration::from_secs(86_400);

    /// A serving SVID valid for two days, issued by `issuer`, whose trust domain's bundle is
    /// `root`.
    fn serving(root: &Ca, issuer: &Ca) -> Result<LiveIdentity, Box<dyn std::error::Error>> {
        let mut spec = LeafSpec::server("spiffe://td.example/ns/edge/sa/sidecar");
        spec.not_after = OffsetDateTime::now_utc() + time::Duration::days(2);
        let svid = issuer.leaf(&spec)?;
        let mut bundles = TrustBundles::new();
        bundles.insert(
            TrustDomain::parse(TRUST_DOMAIN)?,
            parse_bundle(
                root.cert_pem().as_bytes(),
                Path::new("ca.pem"),
                SystemTime::now(),
            )?,
        );
        Ok(LiveIdentity::build(IdentitySnapshot {
            identity: ServerIdentity {
                cert_chain: svid.cert_chain(),
                key: svid.key_der(),
            },
            bundles,
        })?)
    }

    #[test]
    fn readiness_judges_the_chain_when_asked_not_when_built() -> TestResult {
        let now = SystemTime::now();
        let root = Ca::with_validity(
            TRUST_DOMAIN,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            OffsetDateTime::now_utc() + time::Duration::days(10),
        )?;
        // Valid for one day, under a leaf valid for two.
        let intermediate = root.intermediate("td.example intermediate", true)?;
        let live = serving(&root, &intermediate)?;
        assert_eq!(live.readiness(now), Ok(()));
        let after_intermediate = live.readiness(now + DAY + DAY / 2);
        assert!(
            matches!(after_intermediate, Err(ServingProblem::NotChaining { .. })),
            "{after_intermediate:?}"
        );
        // Past the leaf's own end, the leaf is what is reported.
        let after_leaf = live.readiness(now + 3 * DAY);
        assert!(
            matches!(after_leaf, Err(ServingProblem::Expired { .. })),
            "{after_leaf:?}"
        );
        Ok(())
    }

    #[test]
    fn a_root_that_expires_before_the_leaf_breaks_the_chain() -> TestResult {
        let now = SystemTime::now();
        // webpki does not look at a trust anchor's validity; readiness must.
        let root = Ca::with_validity(
            TRUST_DOMAIN,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            OffsetDateTime::now_utc() + time::Duration::days(1),
        )?;
        let live = serving(&root, &root)?;
        assert_eq!(live.readiness(now), Ok(()));
        let after_root = live.readiness(now + DAY + DAY / 2);
        assert!(
            matches!(after_root, Err(ServingProblem::NotChaining { .. })),
            "{after_root:?}"
        );
        Ok(())
    }
}

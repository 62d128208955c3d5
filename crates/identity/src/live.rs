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
    /// Set when the serving chain does not verify against its own trust domain's bundle.
    /// Serving goes on (the bundle may be mid-rotation) but the sidecar is not ready.
    pub chain_problem: Option<ServingProblem>,
    pub certificates: Vec<CertificateExpiry>,
    pub trust_domains: Vec<String>,
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
    /// does not verify is recorded, not refused: refusing it would keep the old bundles, and
    /// a removed root must stop being trusted at once.
    pub fn build(snapshot: IdentitySnapshot) -> Result<Self, LiveIdentityError> {
        let provider = crypto_provider();
        let serving = serving::check_pair(&snapshot.identity, &provider)?;
        let chain_problem = serving::check_chain(
            &snapshot.identity,
            &serving,
            &snapshot.bundles,
            &provider,
            SystemTime::now(),
        )
        .err();
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
            trust_domains.push(domain.to_string());
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
        let tls = server_config(snapshot.identity, &snapshot.bundles)?;
        Ok(Self {
            tls,
            client_key,
            serving,
            chain_problem,
            certificates,
            trust_domains,
        })
    }

    /// Whether this identity can serve at `now`: the SVID is within its validity window and
    /// chains to its own trust domain's bundle.
    pub fn readiness(&self, now: SystemTime) -> Result<(), ServingProblem> {
        serving::check_validity(&self.serving, now)?;
        match &self.chain_problem {
            Some(problem) => Err(problem.clone()),
            None => Ok(()),
        }
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

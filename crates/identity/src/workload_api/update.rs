//! One Workload API update turned into what the TLS side uses, or rejected. Pure: no I/O.

use std::time::SystemTime;

use portcullis_core::{SpiffeId, TrustDomain};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::bundle::{Bundle, TrustBundles, subject_and_expiry};
use crate::server::ServerIdentity;

/// Why an update was not applied. The previous state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The response could not be decoded as the Workload API defines it (missing required
    /// field, unparsable certificate, key or bundle, leaf that is not an X509-SVID).
    #[error("malformed X509-SVID response: {0}")]
    Malformed(#[source] spiffe::WorkloadApiError),
    #[error("the update carries no X509-SVID")]
    NoSvid,
    #[error("SVID {spiffe_id:?} is not a workload SPIFFE ID")]
    NotWorkloadId { spiffe_id: String },
    #[error("SVID {spiffe_id}: private key does not match the certificate")]
    KeyMismatch { spiffe_id: String },
    #[error("trust domain {name:?} is not a valid SPIFFE trust domain")]
    BadTrustDomain { name: String },
    #[error("no bundle for the SVID's own trust domain {trust_domain}")]
    NoOwnBundle { trust_domain: String },
    #[error("every root of trust domain {trust_domain} has expired")]
    OwnBundleExpired { trust_domain: String },
}

/// This workload's identity as last received from the Workload API: the first (default) SVID,
/// its key, and every trust domain's bundle. Each update replaces all of it.
#[derive(Debug)]
pub struct X509Context {
    pub spiffe_id: SpiffeId,
    /// The SVID's chain, leaf first, and its key, as the TLS server presents them.
    pub identity: ServerIdentity,
    /// The own trust domain's bundle and every federated one in the same update.
    pub bundles: TrustBundles,
    /// The leaf's `notAfter` (unix seconds), for the expiry gauge.
    pub not_after: i64,
}

impl X509Context {
    /// A copy of the serving identity for [`crate::server::server_config`], which takes it
    /// by value.
    pub fn server_identity(&self) -> ServerIdentity {
        ServerIdentity {
            cert_chain: self.identity.cert_chain.clone(),
            key: self.identity.key.clone_key(),
        }
    }

    /// The mTLS server configuration for this state.
    pub fn server_config(
        &self,
    ) -> Result<std::sync::Arc<rustls::ServerConfig>, crate::server::ServerIdentityError> {
        crate::server::server_config(self.server_identity(), &self.bundles)
    }
}

/// Validates one decoded response. `spiffe` has already checked the SPIFFE X509-SVID leaf
/// and chain rules and decoded each bundle; what it leaves to the caller is checked here.
pub(crate) fn accept(
    update: &spiffe::X509Context,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<X509Context, UpdateError> {
    // SPIFFE Workload API §5.3 (Default Identity): the first SVID of a response is the default.
    let svid = update.default_svid().ok_or(UpdateError::NoSvid)?;
    let spiffe_id = workload_id(svid.spiffe_id().to_string())?;
    let identity = ServerIdentity {
        cert_chain: svid
            .cert_chain()
            .iter()
            .map(|cert| CertificateDer::from(cert.as_bytes().to_vec()))
            .collect(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        )),
    };
    check_key_matches(&identity, &spiffe_id, provider)?;
    let bundles = trust_bundles(update.bundle_set(), now)?;
    let own = spiffe_id.trust_domain();
    match bundles.get(own.as_str()) {
        Some(_) => {}
        None if update
            .bundle_set()
            .get_ref(svid.spiffe_id().trust_domain())
            .is_some() =>
        {
            return Err(UpdateError::OwnBundleExpired {
                trust_domain: own.to_string(),
            });
        }
        None => {
            return Err(UpdateError::NoOwnBundle {
                trust_domain: own.to_string(),
            });
        }
    }
    let not_after = subject_and_expiry(svid.leaf().as_bytes()).map_or(0, |(_, at)| at);
    Ok(X509Context {
        spiffe_id,
        identity,
        bundles,
        not_after,
    })
}

fn workload_id(id: String) -> Result<SpiffeId, UpdateError> {
    match SpiffeId::parse(&id) {
        Ok(parsed) if parsed.is_workload() => Ok(parsed),
        _ => Err(UpdateError::NotWorkloadId { spiffe_id: id }),
    }
}

/// A key that does not belong to the certificate would make every handshake fail after the
/// swap, so the pair is checked before it can replace a working one. Unknown consistency (a
/// key type whose public half the provider cannot derive) is a failure too: nothing fails open.
fn check_key_matches(
    identity: &ServerIdentity,
    spiffe_id: &SpiffeId,
    provider: &CryptoProvider,
) -> Result<(), UpdateError> {
    let mismatch = || UpdateError::KeyMismatch {
        spiffe_id: spiffe_id.to_string(),
    };
    let key = provider
        .key_provider
        .load_private_key(identity.key.clone_key())
        .map_err(|_| mismatch())?;
    CertifiedKey::new(identity.cert_chain.clone(), key)
        .keys_match()
        .map_err(|_| mismatch())
}

/// Every bundle in the update, with expired roots dropped as for bundle files. A federated
/// trust domain left without roots is not trusted at all (its bundle is omitted), which
/// refuses its callers rather than failing open.
fn trust_bundles(
    set: &spiffe::X509BundleSet,
    now: SystemTime,
) -> Result<TrustBundles, UpdateError> {
    let now = crate::serving::unix(now);
    let mut bundles = TrustBundles::new();
    for (name, bundle) in set.iter() {
        let domain =
            TrustDomain::parse(name.as_str()).map_err(|_| UpdateError::BadTrustDomain {
                name: name.to_string(),
            })?;
        let mut kept = Bundle {
            roots: Vec::new(),
            expiries: Vec::new(),
        };
        for root in bundle.authorities() {
            match subject_and_expiry(root.as_bytes()) {
                Some((subject, not_after)) if not_after >= now => {
                    kept.expiries.push((subject, not_after));
                    kept.roots
                        .push(CertificateDer::from(root.as_bytes().to_vec()));
                }
                Some((subject, _)) => {
                    tracing::warn!(trust_domain = %domain, %subject, "dropping expired root from Workload API bundle");
                }
                None => {
                    tracing::warn!(trust_domain = %domain, "dropping unparsable root from Workload API bundle");
                }
            }
        }
        if kept.roots.is_empty() {
            tracing::warn!(trust_domain = %domain, "Workload API bundle has no usable root; trust domain not accepted");
            continue;
        }
        bundles.insert(domain, kept);
    }
    Ok(bundles)
}

//! Who is calling: the caller's SPIFFE ID from its X509-SVID, checked during the TLS
//! handshake, and the rustls server configuration that enforces it.
//!
//! - [`svid`]: pure X.509 inspection of a leaf certificate (no rustls types, no I/O).
//! - [`bundle`]: per-trust-domain root bundles read from PEM files.
//! - [`verifier`]: the rustls `ClientCertVerifier` that applies the X509-SVID rules.
//! - [`server`]: the mTLS `ServerConfig` (TLS 1.3 and 1.2, ALPN h2 and http/1.1, no resumption).
//! - [`serving`]: checks of this workload's own SVID (validity, X509-SVID shape, key, chain).
//! - [`live`]: the identity in force, published through a `watch` channel by a producer;
//!   [`files`] is the producer that follows `tls.cert`, `tls.key` and the bundle files.
//! - [`claim`]: who a refused caller claimed to be, for the refusal log line.
//! - [`user_token`]: the user an agent acts for: JWT verification against a JWKS, lifetime
//!   caps and RFC 8693 actor binding.
//!
//! This crate decides *who* a caller is, never *what* it may do: that is `portcullis-policy`.

pub mod bundle;
pub mod claim;
pub mod files;
pub mod live;
pub mod server;
pub mod serving;
pub mod svid;
pub mod user_token;
pub mod verifier;
pub mod workload_api;

pub use bundle::{BundleError, TrustBundles};
pub use files::IdentityFiles;
pub use live::{
    CertificateExpiry, IdentityFeed, IdentitySnapshot, LiveIdentity, LiveIdentityError, ReloadKind,
    ReloadObserver,
};
pub use server::{
    ServerIdentity, ServerIdentityError, crypto_provider, seed_random, server_config,
};
pub use svid::{SvidRejection, caller_spiffe_id};
pub use verifier::{SpiffeClientVerifier, handshake_failure_reason};

//! Real parts for tests and for `portcullis demo`: certificate authorities and X509-SVIDs
//! minted in memory, signing keys, JWKS and user tokens, a recording upstream that speaks HTTP/1.1 and streams SSE, and an mTLS
//! client config for a caller.
//!
//! Nothing here is used by the proxy's data path. The binary links it only for `demo`, which
//! needs exactly these parts on a machine with nothing else installed.

pub mod client;
pub mod jwt;
pub mod pki;
pub mod token_exchange;
pub mod upstream;
pub mod workload_api;

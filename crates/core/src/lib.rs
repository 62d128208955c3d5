//! The vocabulary Portcullis decides in: who is calling ([`SpiffeId`], [`UserClaims`]), what
//! they ask to do ([`Action`] on a [`Resource`]) and what was decided ([`Decision`]).
//!
//! No I/O, no TLS, no Cedar: code that only needs to name an identity or an action depends
//! on this crate alone. [`json`] holds the one JSON rule every reader of untrusted JSON
//! (request bodies, user tokens) shares.

pub mod json;
mod spiffe;
mod vocabulary;

pub use spiffe::{MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, SpiffeIdError, TrustDomain};
pub use vocabulary::{
    Action, ActionGroup, Decision, Resource, UserClaims, entity_text, method_name, write_entity,
};

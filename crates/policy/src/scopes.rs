//! `@scope("…")`: what upstream scopes a decision allows, for the credential the sidecar
//! mints after a permit (RFC 8693 token exchange, DESIGN "Approval and upstream
//! credentials").
//!
//! Each question's determining permits that carry `@scope` name the scopes that question
//! grants (their union); the decision grants what every such question grants (the
//! intersection), the same least-privilege rule as the decision itself. A question whose
//! determining permits carry no `@scope` does not narrow.

use crate::QueryOutcome;
use crate::load::PolicySnapshot;

/// What the determining policies' `@scope` annotations allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GrantedScopes {
    /// No determining policy carries `@scope`: the route's configured scope, unnarrowed.
    #[default]
    Unrestricted,
    /// At most these scopes (possibly none).
    AtMost(Vec<String>),
}

impl GrantedScopes {
    /// What both allow (for a batch, every call's grant together).
    pub fn and(self, other: &GrantedScopes) -> GrantedScopes {
        match (self, other) {
            (granted, GrantedScopes::Unrestricted) => granted,
            (GrantedScopes::Unrestricted, other) => other.clone(),
            (GrantedScopes::AtMost(mine), GrantedScopes::AtMost(theirs)) => {
                GrantedScopes::AtMost(mine.into_iter().filter(|s| theirs.contains(s)).collect())
            }
        }
    }

    /// `requested` narrowed to what was granted, in `requested`'s order (borrowed from it:
    /// asked on every call of a route that exchanges a token).
    pub fn narrow<'r>(&self, requested: &'r [String]) -> Vec<&'r str> {
        let granted = |scope: &&String| match self {
            GrantedScopes::Unrestricted => true,
            GrantedScopes::AtMost(allowed) => allowed.contains(scope),
        };
        requested
            .iter()
            .filter(granted)
            .map(String::as_str)
            .collect()
    }
}

impl PolicySnapshot {
    pub(crate) fn granted_scopes(
        &self,
        agent: &QueryOutcome,
        user: Option<&QueryOutcome>,
    ) -> GrantedScopes {
        if self.scopes.is_empty() {
            return GrantedScopes::Unrestricted;
        }
        let mut granted = GrantedScopes::Unrestricted;
        for question in std::iter::once(agent).chain(user) {
            let mut named: Option<Vec<String>> = None;
            for id in question.determining.iter() {
                if let Some(scopes) = self.scopes.get(id) {
                    let named = named.get_or_insert_with(Vec::new);
                    for scope in scopes {
                        if !named.contains(scope) {
                            named.push(scope.clone());
                        }
                    }
                }
            }
            granted = match (granted, named) {
                (granted, None) => granted,
                (GrantedScopes::Unrestricted, Some(named)) => GrantedScopes::AtMost(named),
                (GrantedScopes::AtMost(before), Some(named)) => GrantedScopes::AtMost(
                    before.into_iter().filter(|s| named.contains(s)).collect(),
                ),
            };
        }
        granted
    }
}

//! Cedar policy evaluation for Portcullis: load and validate a policy directory, keep the
//! last good set in force across reloads, and answer the agent and user questions for a
//! request.
//!
//! Evaluation yields a [`Permit`] only when the request may be forwarded; the forwarder takes
//! one by value, so skipping authorization does not compile. No networking, no HTTP types:
//! the proxy classifies requests into [`portcullis_core`] vocabulary before asking.

mod arguments;
mod engine;
mod index;
mod load;
mod scopes;
pub mod tools;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_core::SpiffeId;

pub use engine::{AuthzInput, Evaluation, PreparedAgent, QueryOutcome, RequestInfo};
pub use load::{
    BUILTIN_SCHEMA, ENTITIES_FILE, LoadError, PolicySnapshot, SCHEMA_FILE, SchemaSource,
};
pub use scopes::GrantedScopes;

/// `policy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Policies are evaluated and recorded, but never block: the rollout mode for new policy.
    Shadow,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// Proof that a request was authorized and may be forwarded. Only evaluation creates one.
#[derive(Debug)]
#[must_use = "a permit exists to be handed to the forwarder"]
pub struct Permit {
    _sealed: (),
}

/// The result of a reload attempt.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Nothing to swap in: the files are byte-identical to the set in force, or they changed
    /// while they were read (the next poll reads them again).
    Unchanged,
    /// A new set was validated and swapped in; its hash.
    Reloaded(String),
    /// The new files do not load; the previous set stays in force.
    Failed(Vec<LoadError>),
}

#[derive(Debug)]
struct Current {
    snapshot: PolicySnapshot,
    hash: Arc<str>,
}

/// The policy set in force, swappable while requests are being evaluated.
#[derive(Debug)]
pub struct PolicyEngine {
    dir: PathBuf,
    mode: Mode,
    current: ArcSwap<Current>,
}

impl PolicyEngine {
    /// Loads `dir`; fails with every error if it does not validate.
    pub fn load(dir: &Path, mode: Mode) -> Result<Self, Vec<LoadError>> {
        let snapshot = PolicySnapshot::load(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            mode,
            current: ArcSwap::from_pointee(Current::new(snapshot)),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hash of the set in force.
    pub fn hash(&self) -> Arc<str> {
        self.current.load().hash.clone()
    }

    pub fn policy_count(&self) -> usize {
        self.current.load().snapshot.policy_count
    }

    /// Validator warnings of the set in force (see [`PolicySnapshot::warnings`]).
    pub fn warnings(&self) -> Vec<LoadError> {
        self.current.load().snapshot.warnings.clone()
    }

    /// Whether the set in force uses the built-in schema.
    pub fn schema_source(&self) -> SchemaSource {
        self.current.load().snapshot.schema_source
    }

    /// Every policy id of the set in force with the file that holds it, by file name and
    /// then id.
    pub fn policy_files(&self) -> Vec<(String, String)> {
        self.current.load().snapshot.policy_files()
    }

    /// For each question, the permits whose scope matches `input` (see
    /// `PolicySnapshot::scope_matched_permits`): for explaining a deny.
    pub(crate) fn scope_matched_permits(
        &self,
        input: &AuthzInput<'_>,
    ) -> Result<(Vec<String>, Option<Vec<String>>), String> {
        self.current.load().snapshot.scope_matched_permits(input)
    }

    /// Re-reads the directory; swaps in the new set only if it loads and validates whole.
    pub fn reload(&self) -> ReloadOutcome {
        self.reload_with(PolicySnapshot::load)
    }

    /// [`PolicyEngine::reload`] with the set read by `load`. The files are read one at a
    /// time, so an update landing between two reads (a ConfigMap's `..data` swap, an editor
    /// saving two files) would give a set that was never in the directory: a permit from
    /// before the update with the memberships from after it, allowing what neither allows.
    /// The directory is read again after `load`, and what was read counts only if the
    /// directory still holds exactly that.
    fn reload_with(
        &self,
        load: impl FnOnce(&Path) -> Result<PolicySnapshot, Vec<LoadError>>,
    ) -> ReloadOutcome {
        // Most polls find nothing new: compare contents before parsing and validating.
        let before = PolicySnapshot::fingerprint(&self.dir);
        if before
            .as_ref()
            .is_ok_and(|hash| *hash == *self.current.load().hash)
        {
            return ReloadOutcome::Unchanged;
        }
        let loaded = load(&self.dir);
        let after = PolicySnapshot::fingerprint(&self.dir);
        match loaded {
            Err(_) if after.is_ok() && after.as_ref().ok() != before.as_ref().ok() => {
                ReloadOutcome::Unchanged
            }
            Err(errors) => ReloadOutcome::Failed(errors),
            Ok(snapshot) if after.as_ref().ok() != Some(&snapshot.hash) => ReloadOutcome::Unchanged,
            Ok(snapshot) if snapshot.hash == *self.current.load().hash => ReloadOutcome::Unchanged,
            Ok(snapshot) => {
                let hash = snapshot.hash.clone();
                self.current.store(Arc::new(Current::new(snapshot)));
                ReloadOutcome::Reloaded(hash)
            }
        }
    }

    /// Decides one request against the set in force at this instant.
    pub fn evaluate(&self, input: &AuthzInput<'_>) -> Evaluation {
        self.decide(input, None)
    }

    /// Prepares `agent` for [`PolicyEngine::evaluate_prepared`]: build it once per agent
    /// (or connection), when the peer's SPIFFE ID is known, rather than once per request.
    pub fn prepare_agent(&self, agent: &SpiffeId) -> PreparedAgent {
        PreparedAgent::new(agent.clone(), &self.current.load().snapshot)
    }

    /// [`PolicyEngine::evaluate`] with the agent built ahead. The same decision in every
    /// case: a prepared agent built against an older set rebuilds itself, and one that does
    /// not name `input.agent` is ignored.
    pub fn evaluate_prepared(&self, agent: &PreparedAgent, input: &AuthzInput<'_>) -> Evaluation {
        self.decide(input, Some(agent))
    }

    fn decide(&self, input: &AuthzInput<'_>, agent: Option<&PreparedAgent>) -> Evaluation {
        let current = self.current.load();
        current.snapshot.evaluate(
            input,
            agent,
            self.mode,
            current.hash.clone(),
            engine::Selection::Indexed,
        )
    }
}

impl Current {
    fn new(snapshot: PolicySnapshot) -> Self {
        let hash = Arc::from(snapshot.hash.as_str());
        Self { snapshot, hash }
    }
}

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tests;

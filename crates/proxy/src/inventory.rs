//! The inventory of AI identities: every agent seen, what it did, for whom. The first step of
//! Zero Trust is knowing which non-human identities exist; this answers it from live traffic
//! (`GET /inventory` on the admin listener) and, with the same code, offline from audit files
//! (`portcullis inventory --audit FILE...`).
//!
//! Memory is bounded: per agent at most [`MAX_RESOURCES`] distinct resources of at most
//! [`MAX_RESOURCE_BYTES`] each are listed (the rest are counted: a resource id is the
//! caller's text, a tool name or path of any length, and denied calls are observed too), and
//! distinct users are counted through a set of at most [`MAX_USERS`] entries (beyond it the
//! count is a lower bound, flagged as such).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;

use serde::Serialize;

pub const MAX_RESOURCES: usize = 100;
pub const MAX_RESOURCE_BYTES: usize = 512;
pub const MAX_USERS: usize = 10_000;

/// One decided request, as the inventory needs it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub time: &'a str,
    pub agent: &'a str,
    pub user: Option<&'a str>,
    pub action: Option<&'a str>,
    /// `Type::"id"`.
    pub resource: Option<&'a str>,
    /// `allow`, `deny`, `shadow_deny`, `approval_required`, or `None` when refused before a
    /// decision (bad framing, invalid token).
    pub decision: Option<&'a str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentEntry {
    pub spiffe_id: String,
    pub first_seen: String,
    pub last_seen: String,
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Refused before any decision (invalid user token, malformed request).
    pub refused: u64,
    pub actions: BTreeSet<String>,
    pub resources: BTreeSet<String>,
    /// Calls to resources beyond the listed ones (each call counts: the resources past the
    /// cap are not kept, so how many distinct ones they were is not known).
    pub resources_not_listed: u64,
    pub distinct_users: usize,
    /// True when `distinct_users` reached the tracking cap and is a lower bound.
    pub distinct_users_capped: bool,
    /// Whether it ever called with no user token (autonomously).
    pub called_without_user: bool,
    #[serde(skip)]
    users: HashSet<String>,
}

impl AgentEntry {
    fn observe(&mut self, seen: &Observation<'_>) {
        self.last_seen.clear();
        self.last_seen.push_str(seen.time);
        self.requests += 1;
        match seen.decision {
            Some("allow") => self.allowed += 1,
            Some(_) => self.denied += 1,
            None => self.refused += 1,
        }
        if let Some(action) = seen.action
            && !self.actions.contains(action)
        {
            self.actions.insert(action.to_owned());
        }
        if let Some(resource) = seen.resource
            && !self.resources.contains(resource)
        {
            if self.resources.len() < MAX_RESOURCES && resource.len() <= MAX_RESOURCE_BYTES {
                self.resources.insert(resource.to_owned());
            } else {
                self.resources_not_listed += 1;
            }
        }
        match seen.user {
            // Only a decided call says anything about autonomy; a refused one (an invalid
            // token, say) did not get that far.
            None if seen.decision.is_some() => self.called_without_user = true,
            None => {}
            Some(user) => {
                if !self.users.contains(user) {
                    if self.users.len() < MAX_USERS {
                        self.users.insert(user.to_owned());
                    } else {
                        self.distinct_users_capped = true;
                    }
                }
                self.distinct_users = self.users.len();
            }
        }
    }
}

/// The inventory, keyed by SPIFFE ID.
#[derive(Debug, Default)]
pub struct Inventory {
    agents: Mutex<BTreeMap<String, AgentEntry>>,
}

impl Inventory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one decided request; returns how many agents are known now (one lock a
    /// request, for both).
    pub fn observe(&self, seen: &Observation<'_>) -> usize {
        let Ok(mut agents) = self.agents.lock() else {
            return 0;
        };
        // Looked up by `&str`: an agent seen before costs one lookup and no allocation.
        match agents.get_mut(seen.agent) {
            Some(entry) => entry.observe(seen),
            None => {
                let mut entry = AgentEntry {
                    spiffe_id: seen.agent.to_owned(),
                    first_seen: seen.time.to_owned(),
                    ..AgentEntry::default()
                };
                entry.observe(seen);
                agents.insert(seen.agent.to_owned(), entry);
            }
        }
        agents.len()
    }

    pub fn len(&self) -> usize {
        self.agents.lock().map(|a| a.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `{"agents": [...]}`, sorted by SPIFFE ID.
    pub fn to_json(&self) -> serde_json::Value {
        let agents: Vec<AgentEntry> = self
            .agents
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        serde_json::json!({ "agents": agents })
    }

    /// Feeds one audit line (as written by the audit trail); lines that are not request
    /// records (the `start` line) are skipped.
    pub fn observe_audit_line(&self, record: &serde_json::Value) {
        let Some(agent) = record["agent"].as_str() else {
            return;
        };
        let resource = match (
            record["resource"]["type"].as_str(),
            record["resource"]["id"].as_str(),
        ) {
            (Some(kind), Some(id)) => Some(portcullis_core::entity_text(kind, id)),
            _ => None,
        };
        self.observe(&Observation {
            time: record["time"].as_str().unwrap_or_default(),
            agent,
            user: record["user"]["sub"].as_str(),
            action: record["action"].as_str(),
            resource: resource.as_deref(),
            decision: record["decision"].as_str(),
        });
    }
}

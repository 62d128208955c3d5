//! What the proxy prepares for each calling agent, shared by all of that agent's connections.
//!
//! An agent that opens a connection per call (many HTTP clients do, and every client that
//! reconnects after an idle timeout) would otherwise pay on each connection for what depends
//! only on its SPIFFE ID: its Cedar entity and `context.agent`, the request entities and index
//! selection of the questions it asks (Cedar's transitive closure and the policy index), and
//! its decision counters. Built on an agent's first connection, reused by the next ones; a
//! policy reload is picked up by the prepared agent itself on its next decision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderValue;
use portcullis_core::SpiffeId;
use portcullis_policy::{PolicyEngine, PreparedAgent};

use crate::metrics::{AgentDecisions, Metrics};

/// Agents remembered at once. A sidecar serves a handful; the bound keeps a caller that
/// presents many distinct (valid) SVIDs from growing memory without limit: each entry holds
/// an agent's entity and the entities of the few questions it last asked.
const REMEMBERED_AGENTS: usize = 256;

/// One agent's prepared parts.
#[derive(Debug)]
pub(crate) struct KnownAgent {
    /// Its Cedar entity, `context.agent` and the entities of its recent questions.
    pub prepared: PreparedAgent,
    /// Its decision counters, resolved on first use.
    pub decisions: AgentDecisions,
    /// The agent as the value of the header the upstream receives.
    pub header: Option<HeaderValue>,
}

impl KnownAgent {
    fn new(agent: &SpiffeId, metrics: &Metrics, policy: &PolicyEngine) -> Self {
        Self {
            prepared: policy.prepare_agent(agent),
            decisions: metrics.agent_decisions(agent.as_str()),
            header: HeaderValue::from_str(agent.as_str()).ok(),
        }
    }
}

/// The agents seen recently, by SPIFFE ID.
#[derive(Debug, Default)]
pub(crate) struct KnownAgents(Mutex<HashMap<SpiffeId, Arc<KnownAgent>>>);

impl KnownAgents {
    /// `agent`'s parts: remembered, or prepared now. When the table is full, agents with no
    /// open connection are forgotten; if every remembered agent still has one, the new agent's
    /// parts serve its connection without being remembered.
    pub(crate) fn get(
        &self,
        agent: &SpiffeId,
        metrics: &Metrics,
        policy: &PolicyEngine,
    ) -> Arc<KnownAgent> {
        if let Some(parts) = self.lock().get(agent) {
            return parts.clone();
        }
        // Built without the lock, so other agents' connections do not wait on it; a
        // connection of the same agent that got there first wins.
        let parts = Arc::new(KnownAgent::new(agent, metrics, policy));
        let mut known = self.lock();
        if let Some(first) = known.get(agent) {
            return first.clone();
        }
        if known.len() >= REMEMBERED_AGENTS {
            known.retain(|_, parts| Arc::strong_count(parts) > 1);
        }
        if known.len() < REMEMBERED_AGENTS {
            known.insert(agent.clone(), parts.clone());
        }
        parts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Arc<KnownAgent>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use portcullis_policy::Mode;

    fn agent(index: usize) -> SpiffeId {
        SpiffeId::parse(&format!(
            "spiffe://prod.example.org/ns/team/sa/agent-{index}"
        ))
        .unwrap()
    }

    /// The policy set the repository ships.
    fn engine() -> PolicyEngine {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        PolicyEngine::load(&shipped, Mode::Enforce).unwrap()
    }

    #[test]
    fn an_agents_connections_share_its_parts() {
        let (known, metrics, policy) = (KnownAgents::default(), Metrics::new(), engine());
        let first = known.get(&agent(1), &metrics, &policy);
        let second = known.get(&agent(1), &metrics, &policy);
        let other = known.get(&agent(2), &metrics, &policy);
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(first.prepared.agent(), &agent(1));
        assert_eq!(other.prepared.agent(), &agent(2));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_only_agents_without_connections() {
        let (known, metrics, policy) = (KnownAgents::default(), Metrics::new(), engine());
        // Every remembered agent keeps a connection open.
        let open: Vec<_> = (0..REMEMBERED_AGENTS)
            .map(|i| known.get(&agent(i), &metrics, &policy))
            .collect();
        let extra = known.get(&agent(REMEMBERED_AGENTS), &metrics, &policy);
        assert_eq!(known.len(), REMEMBERED_AGENTS);
        assert_eq!(extra.prepared.agent(), &agent(REMEMBERED_AGENTS));
        assert!(Arc::ptr_eq(
            &open[0],
            &known.get(&agent(0), &metrics, &policy)
        ));
        // Once their connections close, a new agent takes the place of the idle ones.
        drop(open);
        let newcomer = known.get(&agent(REMEMBERED_AGENTS + 1), &metrics, &policy);
        assert_eq!(known.len(), 1);
        assert!(Arc::ptr_eq(
            &newcomer,
            &known.get(&agent(REMEMBERED_AGENTS + 1), &metrics, &policy)
        ));
    }
}

//! MCP session ownership: an `Mcp-Session-Id` belongs to the agent whose request created it.
//!
//! MCP 2025-06-18 (Streamable HTTP, "Session Management"): the server assigns the id in the
//! response to `initialize`, and the client sends it on every later request. The id is a
//! bearer value: a second agent that learns it (logs, a shared cache, a compromised peer)
//! could otherwise speak inside the first agent's session, with whatever state and consent
//! the server keeps there. The proxy records which agent received each id and answers a
//! request carrying an id that is not that agent's with 404, which the transport defines as
//! "session not found" (the client then starts a new session of its own); an id the proxy
//! never saw issued (a restart, an eviction) is refused the same way. Bounded: an agent keeps
//! at most [`MAX_SESSIONS_PER_AGENT`] bindings, past which its own oldest is forgotten (it
//! gets 404 for that one and re-initializes), so no agent can push out another's; past
//! [`MAX_SESSIONS`] in all, the oldest binding of any agent goes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use http::HeaderMap;

pub(crate) const SESSION_HEADER: &str = "mcp-session-id";

/// Bindings kept at most, all agents together.
pub(crate) const MAX_SESSIONS: usize = 65_536;

/// Bindings one agent keeps at most: far more sessions than one workload holds open, and few
/// enough that 64 agents must each fill theirs before the total bound reaches anyone's.
pub(crate) const MAX_SESSIONS_PER_AGENT: usize = 1_024;

#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<Bindings>,
}

#[derive(Debug, Default)]
struct Bindings {
    /// Session id to the agent it was issued to.
    owner: HashMap<String, String>,
    /// Each agent's sessions, oldest first.
    by_agent: HashMap<String, VecDeque<String>>,
    /// Every binding in issue order, for the total bound. Ids forgotten since (ended, or
    /// pushed out by their agent's own bound) stay until reached, and are skipped then.
    order: VecDeque<String>,
}

impl Bindings {
    /// Forgets `session`, issued to `agent`.
    fn forget(&mut self, session: &str, agent: &str) {
        self.owner.remove(session);
        if let Some(sessions) = self.by_agent.get_mut(agent) {
            sessions.retain(|s| s != session);
            if sessions.is_empty() {
                self.by_agent.remove(agent);
            }
        }
    }
}

/// A request's session id is not the calling agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotYours;

impl Sessions {
    /// The session id a request carries (one, as text), if any.
    pub(crate) fn requested(headers: &HeaderMap) -> Result<Option<String>, NotYours> {
        let mut values = headers.get_all(SESSION_HEADER).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(value), None) => value
                .to_str()
                .map(|v| Some(v.to_owned()))
                .map_err(|_| NotYours),
            (Some(_), Some(_)) => Err(NotYours),
        }
    }

    /// Checks that `session` (from the request) was issued to `agent`.
    pub(crate) fn check(&self, session: &str, agent: &str) -> Result<(), NotYours> {
        let bindings = self.inner.lock().map_err(|_| NotYours)?;
        match bindings.owner.get(session) {
            Some(owner) if owner == agent => Ok(()),
            _ => Err(NotYours),
        }
    }

    /// Records the session id a response issues (when the request carried none) as `agent`'s.
    /// An id already bound to another agent is not rebound: the first owner keeps it.
    pub(crate) fn issued(&self, response: &HeaderMap, agent: &str) {
        let Some(session) = response.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let Ok(mut bindings) = self.inner.lock() else {
            return;
        };
        if bindings.owner.contains_key(session) {
            return;
        }
        let bindings = &mut *bindings;
        let mine = bindings.by_agent.entry(agent.to_owned()).or_default();
        if mine.len() >= MAX_SESSIONS_PER_AGENT
            && let Some(oldest) = mine.pop_front()
        {
            bindings.owner.remove(&oldest);
        }
        while bindings.owner.len() >= MAX_SESSIONS {
            let Some(oldest) = bindings.order.pop_front() else {
                break;
            };
            if let Some(owner) = bindings.owner.get(&oldest).cloned() {
                bindings.forget(&oldest, &owner);
            }
        }
        bindings.owner.insert(session.to_owned(), agent.to_owned());
        bindings
            .by_agent
            .entry(agent.to_owned())
            .or_default()
            .push_back(session.to_owned());
        bindings.order.push_back(session.to_owned());
        // Forgotten ids are dropped from the issue order once they are half of it.
        if bindings.order.len() > 2 * MAX_SESSIONS.max(bindings.owner.len()) {
            let owner = &bindings.owner;
            bindings.order.retain(|s| owner.contains_key(s));
        }
    }

    /// Forgets a session its owner deleted.
    pub(crate) fn ended(&self, session: &str) {
        if let Ok(mut bindings) = self.inner.lock()
            && let Some(owner) = bindings.owner.get(session).cloned()
        {
            bindings.forget(session, &owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_belongs_to_the_agent_it_was_issued_to() {
        let sessions = Sessions::default();
        let mut response = HeaderMap::new();
        response.insert(SESSION_HEADER, "s-1".parse().unwrap());
        sessions.issued(&response, "spiffe://td/a");
        assert_eq!(sessions.check("s-1", "spiffe://td/a"), Ok(()));
        assert_eq!(sessions.check("s-1", "spiffe://td/b"), Err(NotYours));
        assert_eq!(sessions.check("s-2", "spiffe://td/a"), Err(NotYours));
        // Another agent's response cannot take it over.
        sessions.issued(&response, "spiffe://td/b");
        assert_eq!(sessions.check("s-1", "spiffe://td/b"), Err(NotYours));
        sessions.ended("s-1");
        assert_eq!(sessions.check("s-1", "spiffe://td/a"), Err(NotYours));
    }

    #[test]
    fn one_agent_cannot_push_out_another_agents_sessions() {
        let sessions = Sessions::default();
        let issue = |id: &str, agent: &str| {
            let mut response = HeaderMap::new();
            response.insert(SESSION_HEADER, id.parse().unwrap());
            sessions.issued(&response, agent);
        };
        issue("victim", "spiffe://td/b");
        for n in 0..MAX_SESSIONS + 10 {
            issue(&format!("flood-{n}"), "spiffe://td/a");
        }
        assert_eq!(sessions.check("victim", "spiffe://td/b"), Ok(()));
        // The flooding agent keeps its newest MAX_SESSIONS_PER_AGENT, and loses its oldest.
        let last = MAX_SESSIONS + 9;
        assert_eq!(
            sessions.check(&format!("flood-{last}"), "spiffe://td/a"),
            Ok(())
        );
        assert_eq!(sessions.check("flood-0", "spiffe://td/a"), Err(NotYours));
        let bindings = sessions.inner.lock().unwrap();
        assert_eq!(bindings.owner.len(), MAX_SESSIONS_PER_AGENT + 1);
        assert!(bindings.order.len() <= 2 * MAX_SESSIONS);
    }

    #[test]
    fn past_the_total_bound_the_oldest_binding_of_any_agent_goes() {
        let sessions = Sessions::default();
        let agents = MAX_SESSIONS / MAX_SESSIONS_PER_AGENT + 1;
        for agent in 0..agents {
            for n in 0..MAX_SESSIONS_PER_AGENT {
                let mut response = HeaderMap::new();
                response.insert(SESSION_HEADER, format!("s-{agent}-{n}").parse().unwrap());
                sessions.issued(&response, &format!("spiffe://td/{agent}"));
            }
        }
        let bindings = sessions.inner.lock().unwrap();
        assert_eq!(bindings.owner.len(), MAX_SESSIONS);
        assert!(!bindings.owner.contains_key("s-0-0"));
        assert!(bindings.owner.contains_key(&format!("s-{}-0", agents - 1)));
        drop(bindings);
        sessions.ended(&format!("s-{}-5", agents - 1));
        assert_eq!(
            sessions.check(
                &format!("s-{}-5", agents - 1),
                &format!("spiffe://td/{}", agents - 1)
            ),
            Err(NotYours)
        );
    }
}

//! MCP session ownership: an `Mcp-Session-Id` belongs to the agent whose request created it.
//!
//! MCP 2025-06-18 (Streamable HTTP, "Session Management"): the server assigns the id in the
//! response to `initialize`, and the client sends it on every later request. The id is a
//! bearer value: a second agent that learns it (logs, a shared cache, a compromised peer)
//! could otherwise speak inside the first agent's session, with whatever state and consent
//! the server keeps there. The proxy records which agent received each id and answers a
//! request carrying an id that is not that agent's with 404, which the transport defines as
//! "session not found" (the client then starts a new session of its own); an id the proxy
//! never saw issued (a restart, an eviction) is refused the same way. Bounded: past
//! [`MAX_SESSIONS`] the oldest binding is forgotten (its owner, too, gets 404 and
//! re-initializes).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use http::HeaderMap;

pub(crate) const SESSION_HEADER: &str = "mcp-session-id";

/// Bindings kept at most.
pub(crate) const MAX_SESSIONS: usize = 65_536;

#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<Bindings>,
}

#[derive(Debug, Default)]
struct Bindings {
    owner: HashMap<String, String>,
    /// Insertion order, for eviction.
    order: VecDeque<String>,
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
        if bindings.order.len() >= MAX_SESSIONS
            && let Some(oldest) = bindings.order.pop_front()
        {
            bindings.owner.remove(&oldest);
        }
        bindings.owner.insert(session.to_owned(), agent.to_owned());
        bindings.order.push_back(session.to_owned());
    }

    /// Forgets a session its owner deleted.
    pub(crate) fn ended(&self, session: &str) {
        if let Ok(mut bindings) = self.inner.lock() {
            bindings.owner.remove(session);
            bindings.order.retain(|s| s != session);
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
}

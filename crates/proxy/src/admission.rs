//! What a request may hold while it is in the proxy: a place among the requests in flight
//! (per agent and in total) and bytes of inspection memory. Both are taken without waiting:
//! a caller over a cap is answered at once (429 / 503 with `retry-after`) instead of queuing
//! behind itself, so one agent at its cap cannot slow anyone else down.
//!
//! What it does not: decide (Cedar does), or bound time (timeouts live with the I/O).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Refusal;

/// The in-flight caps (`limits.max_inflight`, `limits.max_inflight_per_agent`).
///
/// Counted with an atomic per agent and one for the total, so a request takes its place with a
/// compare-and-swap on each and gives it back with a subtraction from each: the agent's count
/// lives in an [`AgentSlot`] its connections share, found once per connection, not by a locked
/// map lookup (hashing the SPIFFE ID) on the way in and again on the way out, as it was.
#[derive(Debug)]
pub(crate) struct Inflight {
    total: AtomicUsize,
    total_cap: usize,
    per_agent_cap: usize,
    /// `limits.max_connections_per_agent`.
    connections_cap: usize,
    /// The slot of each agent that has a connection open or a request in flight. An entry
    /// goes with the agent's last connection and request, so the map is bounded by the open
    /// connections, not by every identity ever seen.
    agents: Mutex<HashMap<Arc<str>, Weak<AgentSlot>>>,
}

/// One agent's requests in flight, shared by its connections (and held by each of its
/// requests in flight, which can outlive their connection).
#[derive(Debug)]
pub(crate) struct AgentSlot {
    agent: Arc<str>,
    inflight: AtomicUsize,
    /// The agent's connections open (past their handshake).
    connections: AtomicUsize,
    owner: Arc<Inflight>,
}

/// One of an agent's `limits.max_connections_per_agent` connections, given back when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionPlace {
    slot: Arc<AgentSlot>,
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.slot.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place among the requests in flight, given back when dropped (when the response body
/// ends or is abandoned).
#[derive(Debug)]
pub(crate) struct InflightPermit {
    slot: Arc<AgentSlot>,
}

impl Inflight {
    pub(crate) fn new(total: usize, per_agent: usize, connections_per_agent: usize) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicUsize::new(0),
            total_cap: total,
            per_agent_cap: per_agent,
            connections_cap: connections_per_agent,
            agents: Mutex::new(HashMap::new()),
        })
    }

    /// The slot `agent`'s requests count in: the one its other connections (or requests
    /// still in flight) use, else a new one. Called once per connection.
    pub(crate) fn slot(self: &Arc<Self>, agent: &Arc<str>) -> Arc<AgentSlot> {
        // The map holds only weak references, consistent after any panic: no reason to
        // refuse connections over a poisoned lock.
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = agents.get(agent).and_then(Weak::upgrade) {
            return slot;
        }
        let slot = Arc::new(AgentSlot {
            agent: agent.clone(),
            inflight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            owner: self.clone(),
        });
        agents.insert(agent.clone(), Arc::downgrade(&slot));
        slot
    }
}

impl AgentSlot {
    /// Takes a place for a connection of this agent; `None` when it has
    /// `limits.max_connections_per_agent` open.
    pub(crate) fn connect(self: &Arc<Self>) -> Option<ConnectionPlace> {
        take_one(&self.connections, self.owner.connections_cap)
            .then(|| ConnectionPlace { slot: self.clone() })
    }

    /// Takes a place for a request of this agent. The agent's own cap is checked first, so
    /// an agent at its cap is told so (429) and does not consume a place of the total.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<InflightPermit, Refusal> {
        let owner = &self.owner;
        if !take_one(&self.inflight, owner.per_agent_cap) {
            return Err(Refusal::AgentBusy);
        }
        if !take_one(&owner.total, owner.total_cap) {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Overloaded);
        }
        Ok(InflightPermit { slot: self.clone() })
    }
}

/// Adds one to `count` unless it is at `cap`: never above it, even for a moment (so a
/// concurrent request is never refused for a place that was not taken).
fn take_one(count: &AtomicUsize, cap: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for InflightPermit {
    fn drop(&mut self) {
        self.slot.owner.total.fetch_sub(1, Ordering::AcqRel);
        self.slot.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        let mut agents = self
            .owner
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Another connection of the agent may have put a new slot in since this one's last
        // holder let go; that one stays.
        if agents
            .get(&self.agent)
            .is_some_and(|entry| entry.strong_count() == 0)
        {
            agents.remove(&self.agent);
        }
    }
}

/// The budget of bytes buffered for inspection (`limits.inspect_memory_bytes`), shared by
/// every inspected request.
#[derive(Debug, Clone)]
pub(crate) struct InspectBudget {
    bytes: Arc<Semaphore>,
}

/// Bytes of the budget held by one request; returned when dropped (when the buffered body
/// has been forwarded, or the request ended).
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: InspectBudget,
    held: Option<OwnedSemaphorePermit>,
}

impl InspectBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// An empty reservation, grown as the body is buffered.
    pub(crate) fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: None,
        }
    }
}

impl Reservation {
    /// Grows the reservation to `total` bytes; `InspectionBudget` when the budget has not
    /// that much left (nothing more is taken then).
    pub(crate) fn grow_to(&mut self, total: usize) -> Result<(), Refusal> {
        let held = self.held();
        if total <= held {
            return Ok(());
        }
        let more = u32::try_from(total - held).map_err(|_| Refusal::InspectionBudget)?;
        let permit = self
            .budget
            .bytes
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| Refusal::InspectionBudget)?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }

    /// Gives back what is held beyond `total` bytes (a buffer that has been drained).
    pub(crate) fn shrink_to(&mut self, total: usize) {
        let held = self.held();
        if total < held
            && let Some(permit) = &mut self.held
        {
            // Dropped at once: its bytes go back to the budget.
            drop(permit.split(held - total));
        }
    }

    pub(crate) fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::{Inflight, InspectBudget};
    use crate::error::Refusal;

    fn agents(inflight: &Inflight) -> usize {
        inflight
            .agents
            .lock()
            .map(|m| m.len())
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn an_agent_at_its_cap_leaves_room_for_others() {
        let inflight = Inflight::new(3, 2, 10);
        let a = inflight.slot(&"spiffe://t/a".into());
        let a1 = a.admit();
        // The agent's second connection counts in the same slot.
        let a2 = inflight.slot(&"spiffe://t/a".into()).admit();
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(a.admit().err(), Some(Refusal::AgentBusy));
        let b = inflight.slot(&"spiffe://t/b".into());
        let b1 = b.admit();
        assert!(b1.is_ok());
        assert_eq!(
            inflight.slot(&"spiffe://t/c".into()).admit().err(),
            Some(Refusal::Overloaded)
        );
        drop(a1);
        assert!(a.admit().is_ok());
        drop((a2, b1));
        assert_eq!(inflight.total.load(Ordering::Acquire), 0);
        assert_eq!(a.inflight.load(Ordering::Acquire), 0);
        // Only connections still open keep an entry.
        assert_eq!(agents(&inflight), 2);
        drop((a, b));
        assert_eq!(agents(&inflight), 0);
    }

    #[test]
    fn the_total_refusal_gives_the_agent_place_back() {
        let inflight = Inflight::new(1, 5, 10);
        let _held = inflight.slot(&"spiffe://t/a".into()).admit();
        let b = inflight.slot(&"spiffe://t/b".into());
        for _ in 0..10 {
            assert_eq!(b.admit().err(), Some(Refusal::Overloaded));
        }
        assert_eq!(b.inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_request_outliving_its_connection_still_counts() {
        let inflight = Inflight::new(10, 1, 10);
        let held = inflight.slot(&"spiffe://t/a".into()).admit();
        assert!(held.is_ok());
        // The connection is gone (its slot dropped); a new one of the same agent finds the
        // request still in flight.
        let again = inflight.slot(&"spiffe://t/a".into());
        assert_eq!(again.admit().err(), Some(Refusal::AgentBusy));
        drop(held);
        assert!(again.admit().is_ok());
        drop(again);
        assert_eq!(agents(&inflight), 0);
    }

    #[test]
    fn caps_hold_under_concurrent_requests() {
        let inflight = Inflight::new(6, 4, 10);
        let slots: Vec<_> = ["spiffe://t/a", "spiffe://t/b"]
            .iter()
            .map(|agent| inflight.slot(&Arc::from(*agent)))
            .collect();
        std::thread::scope(|scope| {
            for slot in slots.iter().cycle().take(8) {
                let inflight = &inflight;
                scope.spawn(move || {
                    for _ in 0..200_000 {
                        let permit = slot.admit();
                        let (agent, total) = (
                            slot.inflight.load(Ordering::Acquire),
                            inflight.total.load(Ordering::Acquire),
                        );
                        assert!(agent <= 4 && total <= 6, "{agent} {total}");
                        drop(permit);
                    }
                });
            }
        });
        assert_eq!(inflight.total.load(Ordering::Acquire), 0);
        assert!(
            slots
                .iter()
                .all(|s| s.inflight.load(Ordering::Acquire) == 0)
        );
    }

    #[test]
    fn reservations_share_one_budget_and_return_it() {
        let budget = InspectBudget::new(100);
        let mut one = budget.reservation();
        let mut two = budget.reservation();
        assert!(one.grow_to(60).is_ok());
        assert_eq!(two.grow_to(50).err(), Some(Refusal::InspectionBudget));
        assert_eq!(two.held(), 0);
        assert!(two.grow_to(40).is_ok());
        drop(one);
        assert!(two.grow_to(100).is_ok());
        assert_eq!(two.held(), 100);
        // A drained buffer gives back what it no longer holds (an event stream's reservation
        // between events); growing again takes it anew.
        two.shrink_to(30);
        assert_eq!(two.held(), 30);
        let mut three = budget.reservation();
        assert!(three.grow_to(70).is_ok());
        assert_eq!(two.grow_to(31).err(), Some(Refusal::InspectionBudget));
        two.shrink_to(0);
        assert_eq!(two.held(), 0);
        assert!(three.grow_to(100).is_ok());
        two.shrink_to(50);
        assert_eq!(two.held(), 0);
    }
}

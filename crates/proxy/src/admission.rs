//! What a request may hold while it is in the proxy: a place among the requests in flight
//! (per agent and in total) and bytes of inspection memory. Both are taken without waiting:
//! a caller over a cap is answered at once (429 / 503 with `retry-after`) instead of queuing
//! behind itself, so one agent at its cap cannot slow anyone else down.
//!
//! What it does not: decide (Cedar does), or bound time (timeouts live with the I/O).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Refusal;

/// The in-flight caps (`limits.max_inflight`, `limits.max_inflight_per_agent`).
#[derive(Debug)]
pub(crate) struct Inflight {
    total: Arc<Semaphore>,
    per_agent_cap: usize,
    /// Requests in flight per agent; an agent with none has no entry, so the map is bounded
    /// by the requests in flight, not by every identity ever seen.
    per_agent: Mutex<HashMap<Arc<str>, usize>>,
}

/// A place among the requests in flight, given back when dropped (when the response body
/// ends or is abandoned).
#[derive(Debug)]
pub(crate) struct InflightPermit {
    _total: OwnedSemaphorePermit,
    agent: Arc<str>,
    owner: Arc<Inflight>,
}

impl Inflight {
    pub(crate) fn new(total: usize, per_agent: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            per_agent_cap: per_agent,
            per_agent: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for a request of `agent`. The agent's own cap is checked first, so an
    /// agent at its cap is told so (429) and does not consume a place of the total.
    pub(crate) fn admit(self: &Arc<Self>, agent: &Arc<str>) -> Result<InflightPermit, Refusal> {
        self.count_agent(agent)?;
        match self.total.clone().try_acquire_owned() {
            Ok(permit) => Ok(InflightPermit {
                _total: permit,
                agent: agent.clone(),
                owner: self.clone(),
            }),
            Err(_) => {
                self.release_agent(agent);
                Err(Refusal::Overloaded)
            }
        }
    }

    /// One hash and probe: the key is the connection's own `Arc`, so an agent's first
    /// request in flight costs no allocation either.
    fn count_agent(&self, agent: &Arc<str>) -> Result<(), Refusal> {
        // A poisoned lock means a panic while counting; refuse rather than admit uncounted.
        let mut map = self.per_agent.lock().map_err(|_| Refusal::Overloaded)?;
        let count = map.entry(agent.clone()).or_insert(0);
        if *count >= self.per_agent_cap {
            if *count == 0 {
                map.remove(agent);
            }
            return Err(Refusal::AgentBusy);
        }
        *count += 1;
        Ok(())
    }

    fn release_agent(&self, agent: &Arc<str>) {
        if let Ok(mut map) = self.per_agent.lock()
            && let Entry::Occupied(mut entry) = map.entry(agent.clone())
        {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

impl Drop for InflightPermit {
    fn drop(&mut self) {
        self.owner.release_agent(&self.agent);
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

    pub(crate) fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

#[cfg(test)]
mod tests {
    use super::{Inflight, InspectBudget};
    use crate::error::Refusal;

    #[test]
    fn an_agent_at_its_cap_leaves_room_for_others() {
        let inflight = Inflight::new(3, 2);
        let a1 = inflight.admit(&"spiffe://t/a".into());
        let a2 = inflight.admit(&"spiffe://t/a".into());
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(
            inflight.admit(&"spiffe://t/a".into()).err(),
            Some(Refusal::AgentBusy)
        );
        let b = inflight.admit(&"spiffe://t/b".into());
        assert!(b.is_ok());
        assert_eq!(
            inflight.admit(&"spiffe://t/c".into()).err(),
            Some(Refusal::Overloaded)
        );
        drop(a1);
        assert!(inflight.admit(&"spiffe://t/a".into()).is_ok());
        drop((a2, b));
        assert_eq!(inflight.total.available_permits(), 3);
        assert!(
            inflight
                .per_agent
                .lock()
                .map(|m| m.is_empty())
                .unwrap_or(false)
        );
    }

    #[test]
    fn the_total_refusal_gives_the_agent_place_back() {
        let inflight = Inflight::new(1, 5);
        let _held = inflight.admit(&"spiffe://t/a".into());
        for _ in 0..10 {
            assert_eq!(
                inflight.admit(&"spiffe://t/b".into()).err(),
                Some(Refusal::Overloaded)
            );
        }
        assert!(
            inflight
                .per_agent
                .lock()
                .map(|m| !m.contains_key("spiffe://t/b"))
                .unwrap_or(false)
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
    }
}

//! Tool annotations remembered from the listings the sidecar filtered, given to policies as
//! `context.tool.annotations`.
//!
//! MCP (2025-06-18, "Tool annotations") lets a server describe each tool it lists with hints:
//! `readOnlyHint`, `destructiveHint`, `idempotentHint`, `openWorldHint`. A `tools/call`
//! carries only the tool's name, so the hints a policy reads on a call are the ones the last
//! `tools/list` (or `server/discover`) result listed for that name on the same route. The
//! spec calls annotations untrusted unless they come from a trusted server; here they come
//! from the pod's own application, the upstream this sidecar fronts, never from the agent
//! (the agent's request has no way to set them).
//!
//! Kept: booleans only, for the four hints, per route, at most [`MAX_TOOLS_PER_ROUTE`] names
//! of at most [`MAX_NAME_BYTES`] bytes; when a route is full the name listed longest ago is
//! forgotten. A listing that shows a tool without hints forgets its old ones. Nothing is
//! kept across restarts: until a tool is listed, its calls carry no `annotations`, and
//! policies are written to fail safe on absence (see `policies/schema.cedarschema`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{PoisonError, RwLock};

use serde_json::{Map, Value};

/// Tools remembered per route; a server listing more has its oldest-listed forgotten.
pub(crate) const MAX_TOOLS_PER_ROUTE: usize = 1024;

/// Longer names are not remembered (MCP tool names are at most 128 characters).
pub(crate) const MAX_NAME_BYTES: usize = 256;

/// The hints, in `context.tool.annotations` order.
const HINTS: [&str; 4] = [
    "readOnlyHint",
    "destructiveHint",
    "idempotentHint",
    "openWorldHint",
];

/// The boolean hints a server gave for one tool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Hints {
    /// Bit `i` set: `HINTS[i]` was given.
    given: u8,
    /// Bit `i`: its value.
    values: u8,
}

impl Hints {
    /// The boolean hints of a listed tool's `annotations`; `None` when it gives none (other
    /// members, such as `title`, and non-boolean values are ignored).
    pub(crate) fn of_tool(tool: &Value) -> Option<Self> {
        let annotations = tool.get("annotations")?.as_object()?;
        let mut hints = Self::default();
        for (i, name) in HINTS.iter().enumerate() {
            if let Some(value) = annotations.get(*name).and_then(Value::as_bool) {
                hints.given |= 1 << i;
                hints.values |= u8::from(value) << i;
            }
        }
        (hints.given != 0).then_some(hints)
    }

    /// The `context.tool.annotations` record: only the hints given.
    pub(crate) fn to_json(self) -> Value {
        let mut record = Map::new();
        for (i, name) in HINTS.iter().enumerate() {
            if self.given & (1 << i) != 0 {
                record.insert((*name).to_owned(), Value::Bool(self.values & (1 << i) != 0));
            }
        }
        Value::Object(record)
    }
}

/// What the listings said, per route index (`routes[]`).
#[derive(Debug)]
pub(crate) struct ToolAnnotations {
    routes: Vec<RwLock<Remembered>>,
}

#[derive(Debug, Default)]
struct Remembered {
    /// Name → hints and when it was last listed (a counter).
    tools: HashMap<String, (Hints, u64)>,
    /// When → name: the oldest-listed name is the first (eviction in O(log n), so a server
    /// listing far more tools than are kept costs little while the lock is held).
    order: BTreeMap<u64, String>,
    clock: u64,
}

impl ToolAnnotations {
    pub(crate) fn new(routes: usize) -> Self {
        Self {
            routes: (0..routes).map(|_| RwLock::default()).collect(),
        }
    }

    /// Records what one listing said about its tools on `route`.
    pub(crate) fn remember<'a>(
        &self,
        route: usize,
        listed: impl IntoIterator<Item = (&'a str, Option<Hints>)>,
    ) {
        let Some(remembered) = self.routes.get(route) else {
            return;
        };
        let mut remembered = remembered.write().unwrap_or_else(PoisonError::into_inner);
        for (name, hints) in listed {
            remembered.listed(name, hints);
        }
    }

    /// The hints last listed for `tool` on `route`.
    pub(crate) fn get(&self, route: usize, tool: &str) -> Option<Hints> {
        let remembered = self
            .routes
            .get(route)?
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        remembered.tools.get(tool).map(|(hints, _)| *hints)
    }
}

impl Remembered {
    fn listed(&mut self, name: &str, hints: Option<Hints>) {
        let Some(hints) = hints else {
            if let Some((_, listed)) = self.tools.remove(name) {
                self.order.remove(&listed);
            }
            return;
        };
        if name.len() > MAX_NAME_BYTES {
            return;
        }
        self.clock += 1;
        if let Some(entry) = self.tools.get_mut(name) {
            let name = self
                .order
                .remove(&entry.1)
                .unwrap_or_else(|| name.to_owned());
            *entry = (hints, self.clock);
            self.order.insert(self.clock, name);
            return;
        }
        if self.tools.len() >= MAX_TOOLS_PER_ROUTE
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.tools.remove(&oldest);
        }
        self.tools.insert(name.to_owned(), (hints, self.clock));
        self.order.insert(self.clock, name.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_boolean_hints_are_kept() {
        let tool = json!({"name": "drop", "annotations": {
            "title": "Drop table", "destructiveHint": true, "readOnlyHint": false,
            "idempotentHint": "yes", "openWorldHint": null,
        }});
        let hints = Hints::of_tool(&tool).unwrap();
        assert_eq!(
            hints.to_json(),
            json!({"readOnlyHint": false, "destructiveHint": true})
        );
        assert_eq!(Hints::of_tool(&json!({"name": "x"})), None);
        assert_eq!(
            Hints::of_tool(&json!({"name": "x", "annotations": {"title": "X"}})),
            None
        );
        assert_eq!(
            Hints::of_tool(&json!({"name": "x", "annotations": [true]})),
            None
        );
    }

    #[test]
    fn a_listing_replaces_and_forgets_per_route() {
        let store = ToolAnnotations::new(2);
        let destructive = Hints::of_tool(&json!({"annotations": {"destructiveHint": true}}));
        let read_only = Hints::of_tool(&json!({"annotations": {"readOnlyHint": true}}));
        store.remember(0, [("drop", destructive), ("get", read_only)]);
        assert_eq!(store.get(0, "drop"), destructive);
        assert_eq!(
            store.get(1, "drop"),
            None,
            "another route's server said nothing"
        );
        store.remember(0, [("drop", read_only), ("get", None)]);
        assert_eq!(store.get(0, "drop"), read_only);
        assert_eq!(store.get(0, "get"), None);
        // Out-of-range routes (no such entry in `routes`) remember and answer nothing.
        store.remember(7, [("drop", destructive)]);
        assert_eq!(store.get(7, "drop"), None);
    }

    #[test]
    fn bounded_per_route_forgetting_the_oldest_listed() {
        let store = ToolAnnotations::new(1);
        let hints = Hints::of_tool(&json!({"annotations": {"idempotentHint": true}}));
        let names: Vec<String> = (0..=MAX_TOOLS_PER_ROUTE).map(|i| format!("t{i}")).collect();
        store.remember(0, [(names[0].as_str(), hints)]);
        store.remember(0, names[1..].iter().map(|n| (n.as_str(), hints)));
        assert_eq!(
            store.get(0, "t0"),
            None,
            "the oldest-listed name was forgotten"
        );
        assert_eq!(store.get(0, "t1"), hints);
        assert_eq!(store.get(0, &format!("t{MAX_TOOLS_PER_ROUTE}")), hints);
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        store.remember(0, [(long.as_str(), hints)]);
        assert_eq!(store.get(0, &long), None);
        assert_eq!(store.get(0, "t1"), hints, "a refused name evicts nothing");
        // Listing t1 again makes it the newest: the next newcomer evicts t2, not t1.
        store.remember(0, [("t1", hints), ("new", hints)]);
        assert_eq!(store.get(0, "t1"), hints);
        assert_eq!(store.get(0, "t2"), None);
        let remembered = store.routes[0].read().unwrap();
        assert_eq!(remembered.tools.len(), MAX_TOOLS_PER_ROUTE);
        assert_eq!(remembered.order.len(), MAX_TOOLS_PER_ROUTE);
    }
}

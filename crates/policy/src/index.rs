//! Which policies can apply to a request, found from their scopes rather than by evaluating
//! every policy of the set.
//!
//! Cedar evaluates a policy as `principal-scope && action-scope && resource-scope && body`,
//! left to right with short-circuiting, and no scope constraint can error (`==`, `in` and `is`
//! on entity references are total). A policy whose scope does not match the request is
//! therefore `false` without error: it can be neither determining nor erroring, and leaving it
//! out changes neither the decision, nor the determining policies, nor the errors. That is the
//! whole argument for this module, and the differential test (`tests::differential`) keeps it
//! honest.
//!
//! The index is an optimisation behind [`crate::PolicyEngine::evaluate`], never a second
//! semantics:
//! - scope matching uses the request's own [`Entities`] (the same store Cedar evaluates
//!   against), so `in` sees declared parents, parents added per request (token groups) and
//!   the action hierarchy exactly as Cedar does;
//! - the selected policies keep the order of the full set, which is Cedar's evaluation order
//!   and so the order of the errors it reports;
//! - it is built with the snapshot and swapped with it on reload.
//!
//! What it does not do: look inside `when`/`unless` bodies (a condition on `principal` is
//! evaluated by Cedar as before), or support templates (the loader refuses them).
//!
//! What it keeps of a policy between requests is its scope and its source text: Cedar's
//! parsed form of a policy (the syntax tree, the annotations, and a copy of the source beside
//! them) takes ~2.9 KB in ~15 allocations, sixteen times the ~175 bytes of a typical
//! per-agent policy, and a sidecar serves few of the agents a set of thousands names. A
//! policy is parsed again from its source (the text Cedar kept of it, parsed and validated
//! with the whole set at load) the first time a sub-set that holds it is built, and kept
//! parsed from then on: idle memory follows the policies the pod's callers use, not the
//! size of the set.

use std::collections::HashMap;
use std::ops::Range;
use std::str::FromStr;
use std::sync::{Arc, OnceLock, RwLock};

use cedar_policy::{
    ActionConstraint, Entities, EntityId, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
    PrincipalConstraint, ResourceConstraint,
};

/// Upper bound on the policies held by cached sub-sets, summed over all entries. A sub-set is
/// keyed by exactly which policies it holds, so the number of distinct keys is bounded by the
/// distinct (principal, groups, action, resource) shapes callers produce; the budget keeps an
/// adversarial mix of them from growing memory. Each cached policy costs roughly its source
/// text plus a few hundred bytes.
const CACHE_POLICY_BUDGET: usize = 16 * 1024;

/// A policy's position in the full set: Cedar's evaluation order.
type Position = u32;

/// The policies of one snapshot, bucketed by one scope constraint each.
#[derive(Debug)]
pub(crate) struct PolicyIndex {
    /// Every policy, in the order of the full set.
    policies: Vec<Stored>,
    /// Every policy's source text, one after the other (one allocation, not one a policy).
    sources: String,
    scopes: Vec<Scope>,
    /// The entities and entity types the scopes name, each once.
    named: Named,
    buckets: Buckets,
    cache: RwLock<SubsetCache>,
    /// The whole set as loaded: what the differential test compares the index against.
    #[cfg(test)]
    pub(crate) all: PolicySet,
}

/// A policy as the index holds it: its id, its source, and its parsed form once a request
/// has needed it.
#[derive(Debug)]
struct Stored {
    id: PolicyId,
    /// Where its text is in [`PolicyIndex::sources`].
    source: Range<usize>,
    /// Boxed: a policy not parsed yet takes a pointer's room, not a `Policy`'s.
    parsed: OnceLock<Box<Result<Policy, String>>>,
}

/// A policy's scope, as Cedar exposes it, with the entities and types it names held once in
/// [`Named`] (a Cedar `EntityUid` takes 120 bytes, a scope of three constraints 488, and the
/// per-agent policies of a large set name the same actions over and over).
#[derive(Debug)]
struct Scope {
    principal: Constraint,
    action: Actions,
    resource: Constraint,
}

/// A principal or resource constraint (`PrincipalConstraint`, `ResourceConstraint`).
#[derive(Debug, Clone, Copy)]
enum Constraint {
    Any,
    Eq(NamedUid),
    In(NamedUid),
    Is(NamedType),
    IsIn(NamedType, NamedUid),
}

/// An action constraint (`ActionConstraint`).
#[derive(Debug)]
enum Actions {
    Any,
    Eq(NamedUid),
    In(Box<[NamedUid]>),
}

/// An entity's place in [`Named::uids`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NamedUid(u32);

/// An entity type's place in [`Named::types`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NamedType(u32);

/// The entities and entity types the scopes name, each once.
#[derive(Debug, Default)]
struct Named {
    uids: Vec<EntityUid>,
    types: Vec<EntityTypeName>,
}

impl Named {
    fn uid(&self, uid: NamedUid) -> &EntityUid {
        &self.uids[uid.0 as usize]
    }

    fn kind(&self, kind: NamedType) -> &EntityTypeName {
        &self.types[kind.0 as usize]
    }
}

/// Gives each entity and type a place in [`Named`] as the scopes are read; dropped once
/// they are.
#[derive(Default)]
struct Naming {
    named: Named,
    uids: HashMap<EntityUid, NamedUid>,
    types: HashMap<EntityTypeName, NamedType>,
}

impl Naming {
    /// Each entity is kept as a copy without its place in the policy text: Cedar's parser
    /// gives every uid it reads its location, which holds the whole file's text (shared), so
    /// one uid kept as parsed kept the file resident (1.77 MB at 10,000 policies) beside the
    /// policies' own texts. Locations take no part in equality or hashing.
    fn uid(&mut self, uid: EntityUid) -> NamedUid {
        if let Some(&named) = self.uids.get(&uid) {
            return named;
        }
        let kind = self.kind(uid.type_name().clone());
        let bare = EntityUid::from_type_name_and_id(
            self.named.kind(kind).clone(),
            EntityId::new(uid.id().unescaped()),
        );
        let uids = &mut self.named.uids;
        uids.push(bare.clone());
        let named = NamedUid(u32::try_from(uids.len() - 1).unwrap_or(u32::MAX));
        self.uids.insert(bare, named);
        named
    }

    /// A type, kept as a copy read from its name alone (see [`Naming::uid`]).
    fn kind(&mut self, kind: EntityTypeName) -> NamedType {
        if let Some(&named) = self.types.get(&kind) {
            return named;
        }
        // A type's name reads back as itself; were it not to, the parsed one is kept.
        let bare = EntityTypeName::from_str(&kind.to_string()).unwrap_or(kind);
        let types = &mut self.named.types;
        types.push(bare.clone());
        let named = NamedType(u32::try_from(types.len() - 1).unwrap_or(u32::MAX));
        self.types.insert(bare, named);
        named
    }

    fn principal(&mut self, constraint: PrincipalConstraint) -> Constraint {
        match constraint {
            PrincipalConstraint::Any => Constraint::Any,
            PrincipalConstraint::Eq(uid) => Constraint::Eq(self.uid(uid)),
            PrincipalConstraint::In(uid) => Constraint::In(self.uid(uid)),
            PrincipalConstraint::Is(kind) => Constraint::Is(self.kind(kind)),
            PrincipalConstraint::IsIn(kind, uid) => {
                Constraint::IsIn(self.kind(kind), self.uid(uid))
            }
        }
    }

    fn resource(&mut self, constraint: ResourceConstraint) -> Constraint {
        match constraint {
            ResourceConstraint::Any => Constraint::Any,
            ResourceConstraint::Eq(uid) => Constraint::Eq(self.uid(uid)),
            ResourceConstraint::In(uid) => Constraint::In(self.uid(uid)),
            ResourceConstraint::Is(kind) => Constraint::Is(self.kind(kind)),
            ResourceConstraint::IsIn(kind, uid) => Constraint::IsIn(self.kind(kind), self.uid(uid)),
        }
    }

    fn action(&mut self, constraint: ActionConstraint) -> Actions {
        match constraint {
            ActionConstraint::Any => Actions::Any,
            ActionConstraint::Eq(uid) => Actions::Eq(self.uid(uid)),
            ActionConstraint::In(groups) => {
                Actions::In(groups.into_iter().map(|uid| self.uid(uid)).collect())
            }
        }
    }

    fn scope(&mut self, policy: &Policy) -> Scope {
        Scope {
            principal: self.principal(policy.principal_constraint()),
            action: self.action(policy.action_constraint()),
            resource: self.resource(policy.resource_constraint()),
        }
    }
}

/// Each policy sits in exactly one bucket (or two or more for `action in [A, B]`), chosen by
/// the most selective constraint of its scope. A request collects the buckets its principal,
/// action and resource can hit; the exact scope check then drops false candidates. Every
/// policy whose scope matches is in a bucket the request hits, because each bucket key is a
/// necessary condition of the constraint it came from.
#[derive(Debug, Default)]
struct Buckets {
    /// `principal == E`.
    principal_eq: HashMap<EntityUid, Vec<Position>>,
    /// `principal in E` and `principal is T in E`: hit by the principal and its ancestors.
    principal_in: HashMap<EntityUid, Vec<Position>>,
    resource_eq: HashMap<EntityUid, Vec<Position>>,
    resource_in: HashMap<EntityUid, Vec<Position>>,
    /// `action == A`.
    action_eq: HashMap<EntityUid, Vec<Position>>,
    /// `action in [A, ...]`: hit by the action and its groups.
    action_in: HashMap<EntityUid, Vec<Position>>,
    principal_is: HashMap<EntityTypeName, Vec<Position>>,
    resource_is: HashMap<EntityTypeName, Vec<Position>>,
    /// Scopes with nothing to key on (`permit (principal, action, resource)`): always
    /// candidates.
    unconstrained: Vec<Position>,
}

/// Sub-sets already built, keyed by the positions they hold.
#[derive(Debug, Default)]
struct SubsetCache {
    sets: HashMap<Box<[Position]>, Arc<PolicySet>>,
    policies_held: usize,
}

/// The request's side of scope matching: one entity of the request and the store that knows
/// its ancestors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) uid: &'a EntityUid,
    pub(crate) entities: &'a Entities,
}

impl<'a> Target<'a> {
    /// Cedar's `uid in group`: equal, or a descendant in the request's entities.
    fn is_in(self, group: &EntityUid) -> bool {
        self.uid == group || self.entities.is_ancestor_of(group, self.uid)
    }

    /// The uid itself, then its ancestors: every `in` bucket key that can hold it.
    fn lineage(self) -> impl Iterator<Item = &'a EntityUid> {
        let ancestors = self.entities.ancestors(self.uid).into_iter().flatten();
        std::iter::once(self.uid).chain(ancestors)
    }
}

/// The three scope targets of one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScopeRequest<'a> {
    pub(crate) principal: Target<'a>,
    pub(crate) action: Target<'a>,
    pub(crate) resource: Target<'a>,
}

impl PolicyIndex {
    /// Every policy, in the order of the full set (what `analyze` reasons about). Those no
    /// request has needed yet are parsed for the caller and not kept.
    pub(crate) fn policies(&self) -> Result<Vec<Policy>, String> {
        self.policies
            .iter()
            .map(|stored| match stored.parsed.get() {
                Some(parsed) => parsed.as_ref().clone(),
                None => self.parse(stored),
            })
            .collect()
    }

    /// Every policy's id, in the order of the full set.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &str> {
        self.policies
            .iter()
            .map(|stored| AsRef::<str>::as_ref(&stored.id))
    }

    /// Indexes `set`, which must hold static policies only (the loader guarantees it).
    pub(crate) fn new(set: &PolicySet) -> Self {
        // Sized once: grown a push at a time, the two would hold up to twice their room.
        let count = set.policies().count();
        let mut sources = String::new();
        let mut policies = Vec::with_capacity(count);
        let mut scopes = Vec::with_capacity(count);
        let mut naming = Naming::default();
        for policy in set.policies() {
            // A policy parsed from text displays as that text (Cedar keeps it).
            let start = sources.len();
            sources.push_str(&policy.to_string());
            policies.push(Stored {
                id: policy.id().clone(),
                source: start..sources.len(),
                parsed: OnceLock::new(),
            });
            scopes.push(naming.scope(policy));
        }
        sources.shrink_to_fit();
        let mut named = naming.named;
        named.uids.shrink_to_fit();
        named.types.shrink_to_fit();
        let mut buckets = Buckets::default();
        for (position, scope) in (0..).zip(&scopes) {
            buckets.insert(position, scope, &named);
        }
        Self {
            policies,
            sources,
            scopes,
            named,
            buckets,
            cache: RwLock::new(SubsetCache::default()),
            #[cfg(test)]
            all: set.clone(),
        }
    }

    /// The policies whose scope matches `request`, as a set Cedar can evaluate.
    pub(crate) fn select(&self, request: ScopeRequest<'_>) -> Result<Arc<PolicySet>, String> {
        let positions = self.matching(request);
        if let Some(set) = self.cached(&positions) {
            return Ok(set);
        }
        let set = Arc::new(self.subset(&positions)?);
        self.remember(positions, &set);
        Ok(set)
    }

    /// Positions of the policies whose scope matches, ascending (the full set's order).
    fn matching(&self, request: ScopeRequest<'_>) -> Vec<Position> {
        let mut positions: Vec<Position> = self
            .buckets
            .candidates(request)
            .filter(|&p| self.scopes[p as usize].matches(request, &self.named))
            .collect();
        positions.sort_unstable();
        // `action in [A, B]` sits in two buckets, and a request may hit both.
        positions.dedup();
        positions
    }

    fn subset(&self, positions: &[Position]) -> Result<PolicySet, String> {
        let mut set = PolicySet::new();
        for &position in positions {
            // Static policies with unique ids from a valid set always parse again and add.
            // Were one refused, a missing forbid could open the door, so the query fails (and
            // denies) instead.
            let policy = self.parsed(position)?;
            set.add(policy.clone())
                .map_err(|e| format!("policy index: {e}"))?;
        }
        Ok(set)
    }

    /// The policy at `position`, parsed from its source the first time it is asked for.
    fn parsed(&self, position: Position) -> Result<&Policy, String> {
        let stored = &self.policies[position as usize];
        stored
            .parsed
            .get_or_init(|| Box::new(self.parse(stored)))
            .as_ref()
            .as_ref()
            .map_err(Clone::clone)
    }

    fn parse(&self, stored: &Stored) -> Result<Policy, String> {
        let source = self.sources.get(stored.source.clone()).unwrap_or_default();
        Policy::parse(Some(stored.id.clone()), source).map_err(|e| {
            let id: &str = stored.id.as_ref();
            format!("policy index: policy {id:?} does not parse again: {e}")
        })
    }

    fn cached(&self, positions: &[Position]) -> Option<Arc<PolicySet>> {
        let cache = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.sets.get(positions).cloned()
    }

    fn remember(&self, positions: Vec<Position>, set: &Arc<PolicySet>) {
        if positions.len() > CACHE_POLICY_BUDGET / 4 {
            // A huge sub-set costs as much to evaluate as to build; do not let it evict many
            // small ones.
            return;
        }
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.policies_held + positions.len() > CACHE_POLICY_BUDGET {
            // Crude but bounded: shapes seen again are rebuilt on their next request.
            cache.sets.clear();
            cache.policies_held = 0;
        }
        cache.policies_held += positions.len();
        cache.sets.insert(positions.into_boxed_slice(), set.clone());
    }

    /// How many policies have been parsed since the set was loaded.
    #[cfg(test)]
    pub(crate) fn parsed_policies(&self) -> usize {
        self.policies
            .iter()
            .filter(|stored| stored.parsed.get().is_some())
            .count()
    }

    #[cfg(test)]
    pub(crate) fn cached_sets(&self) -> usize {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sets
            .len()
    }
}

impl Scope {
    /// Cedar's scope semantics, evaluated against the request's entities.
    fn matches(&self, request: ScopeRequest<'_>, named: &Named) -> bool {
        self.principal.matches(request.principal, named)
            && self.action.matches(request.action, named)
            && self.resource.matches(request.resource, named)
    }
}

impl Constraint {
    fn matches(self, target: Target<'_>, named: &Named) -> bool {
        match self {
            Self::Any => true,
            Self::Eq(uid) => target.uid == named.uid(uid),
            Self::In(group) => target.is_in(named.uid(group)),
            Self::Is(kind) => target.uid.type_name() == named.kind(kind),
            Self::IsIn(kind, group) => {
                target.uid.type_name() == named.kind(kind) && target.is_in(named.uid(group))
            }
        }
    }
}

impl Actions {
    fn matches(&self, target: Target<'_>, named: &Named) -> bool {
        match self {
            Self::Any => true,
            Self::Eq(uid) => target.uid == named.uid(*uid),
            Self::In(groups) => groups.iter().any(|&group| target.is_in(named.uid(group))),
        }
    }
}

impl Buckets {
    /// Files `position` under its most selective constraint: a named principal or resource
    /// first (per-agent policies), then the action, then an entity type.
    fn insert(&mut self, position: Position, scope: &Scope, named: &Named) {
        let file = |map: &mut HashMap<EntityUid, Vec<Position>>, uid: NamedUid| {
            map.entry(named.uid(uid).clone())
                .or_default()
                .push(position);
        };
        match (scope.principal, scope.resource, &scope.action) {
            (Constraint::Eq(uid), _, _) => file(&mut self.principal_eq, uid),
            (Constraint::In(uid) | Constraint::IsIn(_, uid), _, _) => {
                file(&mut self.principal_in, uid);
            }
            (_, Constraint::Eq(uid), _) => file(&mut self.resource_eq, uid),
            (_, Constraint::In(uid) | Constraint::IsIn(_, uid), _) => {
                file(&mut self.resource_in, uid);
            }
            (_, _, Actions::Eq(uid)) => file(&mut self.action_eq, *uid),
            (_, _, Actions::In(groups)) if !groups.is_empty() => {
                for &group in groups {
                    file(&mut self.action_in, group);
                }
            }
            (Constraint::Is(kind), _, _) => {
                self.principal_is
                    .entry(named.kind(kind).clone())
                    .or_default()
                    .push(position);
            }
            (_, Constraint::Is(kind), _) => {
                self.resource_is
                    .entry(named.kind(kind).clone())
                    .or_default()
                    .push(position);
            }
            // `action in []` never matches; it stays a candidate so the exact check, not the
            // bucketing, is what decides that.
            _ => self.unconstrained.push(position),
        }
    }

    /// Every position the request can hit, possibly with repeats and false candidates.
    fn candidates<'s>(&'s self, request: ScopeRequest<'s>) -> impl Iterator<Item = Position> + 's {
        let by_uid = |map: &'s HashMap<EntityUid, Vec<Position>>, uid: &EntityUid| {
            map.get(uid).map_or(&[][..], Vec::as_slice)
        };
        let by_type = |map: &'s HashMap<EntityTypeName, Vec<Position>>, uid: &EntityUid| {
            map.get(uid.type_name()).map_or(&[][..], Vec::as_slice)
        };
        let principal = request.principal;
        let action = request.action;
        let resource = request.resource;
        [
            &self.unconstrained[..],
            by_uid(&self.principal_eq, principal.uid),
            by_uid(&self.resource_eq, resource.uid),
            by_uid(&self.action_eq, action.uid),
            by_type(&self.principal_is, principal.uid),
            by_type(&self.resource_is, resource.uid),
        ]
        .into_iter()
        .chain(
            principal
                .lineage()
                .map(move |uid| by_uid(&self.principal_in, uid)),
        )
        .chain(
            resource
                .lineage()
                .map(move |uid| by_uid(&self.resource_in, uid)),
        )
        .chain(
            action
                .lineage()
                .map(move |uid| by_uid(&self.action_in, uid)),
        )
        .flatten()
        .copied()
    }
}

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
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::ops::Range;
use std::str::FromStr;
use std::sync::{Arc, OnceLock, RwLock};

use cedar_policy::{
    ActionConstraint, Entities, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
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
    source: Range<u32>,
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
#[derive(Debug, Clone, Copy)]
enum Actions {
    Any,
    Eq(NamedUid),
    In(NamedList),
}

/// An entity's place in [`Named::uids`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NamedUid(u32);

/// An entity type's place in [`Named::types`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NamedType(u32);

/// A list of actions' place in [`Named::lists`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NamedList(u32);

/// The entities, entity types and action lists the scopes name, each once.
#[derive(Debug, Default)]
struct Named {
    uids: Vec<NamedEntity>,
    /// The entities' ids, one after the other (one allocation, not one an entity).
    ids: String,
    types: Vec<EntityTypeName>,
    /// `action in [...]`'s lists: the per-agent policies of a large set repeat a few.
    lists: Vec<Box<[NamedUid]>>,
}

/// An entity a scope names, as its type's place and where its id is in [`Named::ids`]: a
/// Cedar `EntityUid` takes 120 bytes (its type's name and its place in the policy text
/// inline) and its id an allocation of its own, this 12, and a set of per-agent policies
/// names an entity a policy.
#[derive(Debug, Clone, Copy)]
struct NamedEntity {
    kind: NamedType,
    id: (u32, u32),
}

impl Named {
    /// Whether `uid` is the entity named `named`: the same type and the same id, which is
    /// Cedar's equality of entity uids.
    fn is(&self, named: NamedUid, uid: &EntityUid) -> bool {
        let entity = self.uids[named.0 as usize];
        let (start, end) = entity.id;
        self.ids.get(start as usize..end as usize) == Some(uid.id().unescaped())
            && uid.type_name() == self.kind(entity.kind)
    }

    fn kind(&self, kind: NamedType) -> &EntityTypeName {
        &self.types[kind.0 as usize]
    }

    fn list(&self, list: NamedList) -> &[NamedUid] {
        &self.lists[list.0 as usize]
    }
}

/// A length or an offset in the index's texts as the index keeps it. Texts of 4 GiB or more
/// are not held (a set that size is refused long before by the loader's limits); were they,
/// the offset saturates and what it points at reads as missing.
fn place(offset: usize) -> u32 {
    u32::try_from(offset).unwrap_or(u32::MAX)
}

/// Gives each entity and type a place in [`Named`], and its key in the buckets, as the
/// scopes are read; dropped once they are.
struct Naming {
    named: Named,
    keys: RandomState,
    uids: HashMap<EntityUid, NamedUid>,
    types: HashMap<EntityTypeName, NamedType>,
    lists: HashMap<Box<[NamedUid]>, NamedList>,
    /// Each named entity's key, by its place.
    uid_keys: Vec<Key>,
    /// Each named type's key, by its place.
    type_keys: Vec<Key>,
}

impl Naming {
    fn new(keys: RandomState) -> Self {
        Self {
            named: Named::default(),
            keys,
            uids: HashMap::new(),
            types: HashMap::new(),
            lists: HashMap::new(),
            uid_keys: Vec::new(),
            type_keys: Vec::new(),
        }
    }

    /// Each entity is kept as its type and id, not as Cedar's uid: besides its size, a uid
    /// as parsed holds its place in the policy text, and that holds the whole file's text
    /// (1.77 MB at 10,000 policies) beside the policies' own texts.
    fn uid(&mut self, uid: EntityUid) -> NamedUid {
        if let Some(&named) = self.uids.get(&uid) {
            return named;
        }
        let kind = self.kind(uid.type_name().clone());
        let ids = &mut self.named.ids;
        let start = place(ids.len());
        ids.push_str(uid.id().unescaped());
        let uids = &mut self.named.uids;
        uids.push(NamedEntity {
            kind,
            id: (start, place(ids.len())),
        });
        let named = NamedUid(u32::try_from(uids.len() - 1).unwrap_or(u32::MAX));
        // Locations take no part in equality or hashing: the key is the request's uid's.
        self.uid_keys.push(self.keys.hash_one(&uid));
        self.uids.insert(uid, named);
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
        self.type_keys.push(self.keys.hash_one(&bare));
        self.types.insert(bare, named);
        named
    }

    fn uid_key(&self, uid: NamedUid) -> Key {
        self.uid_keys[uid.0 as usize]
    }

    fn type_key(&self, kind: NamedType) -> Key {
        self.type_keys[kind.0 as usize]
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
                let list: Box<[NamedUid]> = groups.into_iter().map(|uid| self.uid(uid)).collect();
                if let Some(&named) = self.lists.get(&list) {
                    return Actions::In(named);
                }
                let lists = &mut self.named.lists;
                lists.push(list.clone());
                let named = NamedList(u32::try_from(lists.len() - 1).unwrap_or(u32::MAX));
                self.lists.insert(list, named);
                Actions::In(named)
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

/// A bucket's key: the hash of the entity or entity type a constraint names, with the
/// index's own random keys. A table keyed by Cedar's 120-byte uids took 2.4 MB for 10,000
/// per-agent policies; keyed by hashes, 0.3 MB. Two entities of one hash would share a
/// bucket, and the exact scope check drops the other's policies, as it drops every false
/// candidate.
type Key = u64;

/// Each policy sits in exactly one bucket (or two or more for `action in [A, B]`), chosen by
/// the most selective constraint of its scope. A request collects the buckets its principal,
/// action and resource can hit; the exact scope check then drops false candidates. Every
/// policy whose scope matches is in a bucket the request hits, because each bucket key is a
/// necessary condition of the constraint it came from.
#[derive(Debug)]
struct Buckets {
    keys: RandomState,
    by: [Bucket; By::COUNT],
    /// Scopes with nothing to key on (`permit (principal, action, resource)`): always
    /// candidates.
    unconstrained: Box<[Position]>,
}

/// What a bucket is keyed by.
#[derive(Debug, Clone, Copy)]
enum By {
    /// `principal == E`.
    PrincipalEq,
    /// `principal in E` and `principal is T in E`: hit by the principal and its ancestors.
    PrincipalIn,
    ResourceEq,
    ResourceIn,
    /// `action == A`.
    ActionEq,
    /// `action in [A, ...]`: hit by the action and its groups.
    ActionIn,
    PrincipalIs,
    ResourceIs,
}

impl By {
    const COUNT: usize = 8;
}

/// The positions filed under each key of one kind, each key's one after the other.
#[derive(Debug, Default)]
struct Bucket {
    /// Where each key's positions are in `positions`.
    ranges: HashMap<Key, (u32, u32), BuildHasherDefault<KeyHasher>>,
    positions: Box<[Position]>,
}

impl Bucket {
    fn new(mut filed: Vec<(Key, Position)>) -> Self {
        filed.sort_unstable();
        let mut ranges = HashMap::default();
        let mut positions = Vec::with_capacity(filed.len());
        let place = |positions: &Vec<Position>| u32::try_from(positions.len()).unwrap_or(u32::MAX);
        for same_key in filed.chunk_by(|a, b| a.0 == b.0) {
            let start = place(&positions);
            positions.extend(same_key.iter().map(|&(_, position)| position));
            if let Some(&(key, _)) = same_key.first() {
                ranges.insert(key, (start, place(&positions)));
            }
        }
        ranges.shrink_to_fit();
        Self {
            ranges,
            positions: positions.into_boxed_slice(),
        }
    }

    fn get(&self, key: Key) -> &[Position] {
        self.ranges
            .get(&key)
            .and_then(|&(start, end)| self.positions.get(start as usize..end as usize))
            .unwrap_or_default()
    }
}

/// The hasher of a bucket's table: its keys are hashes already.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (keys are `u64`); this keeps any other use correct.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
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
    /// Cedar's `uid in group`: equal, or a descendant in the request's entities (whose
    /// ancestors are the transitive closure Cedar's own `in` reads).
    fn is_in(self, group: NamedUid, named: &Named) -> bool {
        self.lineage().any(|uid| named.is(group, uid))
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
        let mut naming = Naming::new(RandomState::new());
        for policy in set.policies() {
            // A policy parsed from text displays as that text (Cedar keeps it).
            let start = sources.len();
            sources.push_str(&policy.to_string());
            policies.push(Stored {
                id: policy.id().clone(),
                source: place(start)..place(sources.len()),
                parsed: OnceLock::new(),
            });
            scopes.push(naming.scope(policy));
        }
        sources.shrink_to_fit();
        let buckets = Buckets::new(&scopes, &naming);
        let mut named = naming.named;
        named.uids.shrink_to_fit();
        named.ids.shrink_to_fit();
        named.types.shrink_to_fit();
        named.lists.shrink_to_fit();
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
        // Were the texts over 4 GiB, a policy past them reads as empty and fails to parse:
        // the query fails and denies.
        let Range { start, end } = stored.source;
        let source = self
            .sources
            .get(start as usize..end as usize)
            .unwrap_or_default();
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
            Self::Eq(uid) => named.is(uid, target.uid),
            Self::In(group) => target.is_in(group, named),
            Self::Is(kind) => target.uid.type_name() == named.kind(kind),
            Self::IsIn(kind, group) => {
                target.uid.type_name() == named.kind(kind) && target.is_in(group, named)
            }
        }
    }
}

impl Actions {
    fn matches(self, target: Target<'_>, named: &Named) -> bool {
        match self {
            Self::Any => true,
            Self::Eq(uid) => named.is(uid, target.uid),
            Self::In(groups) => named
                .list(groups)
                .iter()
                .any(|&group| target.is_in(group, named)),
        }
    }
}

impl Buckets {
    /// Files each policy under its most selective constraint: a named principal or resource
    /// first (per-agent policies), then the action, then an entity type.
    fn new(scopes: &[Scope], naming: &Naming) -> Self {
        let mut filed: [Vec<(Key, Position)>; By::COUNT] = Default::default();
        let mut unconstrained = Vec::new();
        for (position, scope) in (0..).zip(scopes) {
            let mut file = |by: By, key: Key| filed[by as usize].push((key, position));
            let uid = |uid: NamedUid| naming.uid_key(uid);
            match (scope.principal, scope.resource, scope.action) {
                (Constraint::Eq(named), _, _) => file(By::PrincipalEq, uid(named)),
                (Constraint::In(named) | Constraint::IsIn(_, named), _, _) => {
                    file(By::PrincipalIn, uid(named));
                }
                (_, Constraint::Eq(named), _) => file(By::ResourceEq, uid(named)),
                (_, Constraint::In(named) | Constraint::IsIn(_, named), _) => {
                    file(By::ResourceIn, uid(named));
                }
                (_, _, Actions::Eq(named)) => file(By::ActionEq, uid(named)),
                (_, _, Actions::In(groups)) if !naming.named.list(groups).is_empty() => {
                    for &group in naming.named.list(groups) {
                        file(By::ActionIn, uid(group));
                    }
                }
                (Constraint::Is(kind), _, _) => file(By::PrincipalIs, naming.type_key(kind)),
                (_, Constraint::Is(kind), _) => file(By::ResourceIs, naming.type_key(kind)),
                // `action in []` never matches; it stays a candidate so the exact check, not
                // the bucketing, is what decides that.
                _ => unconstrained.push(position),
            }
        }
        Self {
            keys: naming.keys.clone(),
            by: filed.map(Bucket::new),
            unconstrained: unconstrained.into_boxed_slice(),
        }
    }

    fn bucket(&self, by: By) -> &Bucket {
        &self.by[by as usize]
    }

    /// Every position the request can hit, possibly with repeats and false candidates.
    fn candidates<'s>(&'s self, request: ScopeRequest<'s>) -> impl Iterator<Item = Position> + 's {
        let by_uid = move |by: By, uid: &EntityUid| self.bucket(by).get(self.keys.hash_one(uid));
        let by_type =
            |by: By, uid: &EntityUid| self.bucket(by).get(self.keys.hash_one(uid.type_name()));
        let principal = request.principal;
        let action = request.action;
        let resource = request.resource;
        [
            &self.unconstrained[..],
            by_uid(By::PrincipalEq, principal.uid),
            by_uid(By::ResourceEq, resource.uid),
            by_uid(By::ActionEq, action.uid),
            by_type(By::PrincipalIs, principal.uid),
            by_type(By::ResourceIs, resource.uid),
        ]
        .into_iter()
        .chain(
            principal
                .lineage()
                .map(move |uid| by_uid(By::PrincipalIn, uid)),
        )
        .chain(
            resource
                .lineage()
                .map(move |uid| by_uid(By::ResourceIn, uid)),
        )
        .chain(action.lineage().map(move |uid| by_uid(By::ActionIn, uid)))
        .flatten()
        .copied()
    }
}

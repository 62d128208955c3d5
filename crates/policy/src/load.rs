//! Reading a policy directory into a validated [`PolicySnapshot`], or every reason it cannot be.
//!
//! The directory holds `schema.cedarschema`, any number of `*.cedar` files and an optional
//! `entities.json`. Without a schema file the schema built into the binary (the shipped
//! `policies/schema.cedarschema`) is used, and [`PolicySnapshot::schema_source`] says so. Every policy must carry a unique `@id("...")`; that id, not
//! Cedar's positional `policy0`, is what audit records and metrics name. Policies are
//! validated against the schema in strict mode; a set that does not validate is never used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use cedar_policy::{
    Entities, Entity, EntityTypeName, EntityUid, PolicyId, PolicySet, Schema, ValidationMode,
    Validator,
};
use portcullis_core::SpiffeId;
use sha2::{Digest, Sha256};

pub const SCHEMA_FILE: &str = "schema.cedarschema";

/// The shipped schema, used when a policy directory has no `schema.cedarschema`.
pub const BUILTIN_SCHEMA: &str = include_str!("../../../policies/schema.cedarschema");

/// Where the schema of a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaSource {
    /// `schema.cedarschema` in the policy directory.
    File,
    /// The directory has none: [`BUILTIN_SCHEMA`].
    BuiltIn,
}

/// Source of [`PolicySnapshot::generation`].
static GENERATION: AtomicU64 = AtomicU64::new(0);
pub const ENTITIES_FILE: &str = "entities.json";

/// One reason a policy directory cannot be loaded (or, as a warning, a reason to doubt it),
/// tied to the file it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file, relative to the policy directory (or the directory itself), followed by
    /// `:line:column` when Cedar located the problem in it.
    pub file: String,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for LoadError {}

/// A loaded, validated policy set with everything evaluation needs. Immutable: a reload
/// builds a new snapshot and swaps it in whole.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub(crate) schema: Schema,
    /// The policies, bucketed by scope: a request evaluates only those that can apply (see
    /// `index`).
    pub(crate) index: crate::index::PolicyIndex,
    /// Memberships from entities.json, with transitive closure computed.
    pub(crate) entities: Entities,
    /// For each action of the schema, by name: its uid, and its entity with the entities of
    /// the groups above it (`GET` → `Action::"GET"`, [`GET`, `read`]). A request carries only
    /// its own action's lineage, which is all `action in ...` needs.
    pub(crate) action_lineage: HashMap<String, (EntityUid, Vec<Entity>)>,
    /// Policy ids annotated `@approval("required")`.
    pub(crate) approval_required: HashSet<String>,
    /// `@scope("a b")` of each policy that has one: the upstream scopes its permit grants.
    pub(crate) scopes: HashMap<String, Vec<String>>,
    /// The per-tool argument records of `ToolArguments`, for projecting `tools/call`
    /// arguments.
    pub(crate) tool_arguments: crate::arguments::ToolArgumentShapes,
    /// SHA-256 over every file name and content, hex: the `policy_hash` of audit records.
    pub hash: String,
    /// Unique per loaded snapshot (unlike `hash`, which a reload back to old files repeats):
    /// what a [`crate::PreparedAgent`] checks to know it was built against this snapshot.
    pub(crate) generation: u64,
    pub policy_count: usize,
    /// Request shapes already validated against `schema` (see `engine::ValidatedShapes`).
    pub(crate) validated_shapes: crate::engine::ValidatedShapes,
    /// Cedar validator warnings (a policy that can never apply, ...) and an empty set: the
    /// set loads, but probably does not say what its authors meant.
    pub warnings: Vec<LoadError>,
    pub schema_source: SchemaSource,
    /// The `.cedar` files that hold policies, sorted by name.
    pub(crate) policy_files: Box<[String]>,
    /// For each policy, in the index's order, its file's place in `policy_files`: a `u32` a
    /// policy, where a map of id to file name held ~140 bytes a policy and a list of the ids
    /// another ~50, beside the index's own ids, for the policy tools alone.
    pub(crate) file_of_policy: Box<[u32]>,
}

impl PolicySnapshot {
    /// Reads and validates `dir`. Errors are all collected, not just the first.
    pub fn load(dir: &Path) -> Result<Self, Vec<LoadError>> {
        let files = read_dir(dir)?;
        let mut errors = Vec::new();

        let (schema_src, schema_source) = match files.get(SCHEMA_FILE) {
            Some(src) => (src.as_str(), SchemaSource::File),
            None => (BUILTIN_SCHEMA, SchemaSource::BuiltIn),
        };
        let parsed = match over_bounds(SCHEMA_FILE, schema_src) {
            Some(e) => Err(e),
            None => Schema::from_cedarschema_str(schema_src)
                .map_err(|e| located(SCHEMA_FILE, schema_src, &e)),
        };
        let schema = match parsed.map(|(schema, _)| {
            let shapes = crate::arguments::ToolArgumentShapes::from_cedarschema(schema_src)
                .map_err(|message| error(SCHEMA_FILE, message));
            (schema, shapes)
        }) {
            Ok((schema, Ok(shapes))) => Some((schema, shapes)),
            Ok((_, Err(e))) => {
                errors.push(e);
                None
            }
            Err(e) => {
                errors.push(e);
                None
            }
        };

        let mut policies = PolicySet::new();
        let mut origin: HashMap<String, String> = HashMap::new();
        let mut approval_required = HashSet::new();
        let mut scopes = HashMap::new();
        for (name, src) in files.iter().filter(|(name, _)| name.ends_with(".cedar")) {
            if let Some(e) = over_bounds(name, src) {
                errors.push(e);
                continue;
            }
            let parsed = match PolicySet::from_str(src) {
                Ok(parsed) => parsed,
                Err(e) => {
                    errors.push(located(name, src, &e));
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                errors.push(error(
                    name,
                    "templates are not supported; write static policies",
                ));
            }
            for policy in parsed.policies() {
                let Some(id) = policy.annotation("id").map(str::to_owned) else {
                    errors.push(error(
                        name,
                        format!(
                            "a policy has no @id(\"...\") annotation: {}",
                            first_line(&policy.to_string())
                        ),
                    ));
                    continue;
                };
                if let Some(other) = origin.get(&id) {
                    errors.push(error(
                        name,
                        format!("duplicate policy id {id:?} (also in {other})"),
                    ));
                    continue;
                }
                match policy.annotation("approval") {
                    None => {}
                    Some("required") => {
                        approval_required.insert(id.clone());
                    }
                    Some(other) => errors.push(error(
                        name,
                        format!("policy {id:?}: @approval must be \"required\", not {other:?}"),
                    )),
                }
                if let Some(scope) = policy.annotation("scope") {
                    let list: Vec<String> = scope.split_whitespace().map(str::to_owned).collect();
                    if list.is_empty() || policy.effect() != cedar_policy::Effect::Permit {
                        errors.push(error(
                            name,
                            format!("policy {id:?}: @scope names scopes, on a permit"),
                        ));
                    }
                    scopes.insert(id.clone(), list);
                }
                origin.insert(id.clone(), name.clone());
                if let Err(e) = policies.add(policy.new_id(PolicyId::new(&id))) {
                    errors.push(error(name, format!("policy {id:?}: {e}")));
                }
            }
        }

        let Some((schema, tool_arguments)) = schema else {
            return Err(errors);
        };

        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        let in_file = |id: &str, e: &dyn miette::Diagnostic| {
            let file = origin.get(id).map_or("policies", String::as_str);
            let mut found = located(file, files.get(file).map_or("", String::as_str), e);
            found.message = format!("policy {id:?}: {}", found.message);
            found
        };
        for e in validation.validation_errors() {
            errors.push(in_file(e.policy_id().as_ref(), e));
        }
        let mut warnings: Vec<LoadError> = validation
            .validation_warnings()
            .map(|w| in_file(w.policy_id().as_ref(), w))
            .collect();
        if policies
            .policies()
            .all(|p| p.effect() == cedar_policy::Effect::Forbid)
        {
            warnings.push(error(
                &dir.display().to_string(),
                "no permit policies: every request will be denied",
            ));
        }

        let entities = match files.get(ENTITIES_FILE) {
            None => Some(Entities::empty()),
            Some(src) => match entities_from_json(src, &schema) {
                Ok(entities) => Some(entities),
                Err(messages) => {
                    errors.extend(messages.into_iter().map(|m| error(ENTITIES_FILE, m)));
                    None
                }
            },
        };
        let action_lineage = match schema.action_entities() {
            Ok(actions) => actions
                .iter()
                .map(|action| {
                    let uid = action.uid();
                    let mut lineage = vec![action.clone()];
                    if let Some(ancestors) = actions.ancestors(&uid) {
                        lineage.extend(ancestors.filter_map(|a| actions.get(a)).cloned());
                    }
                    (uid.id().unescaped().to_owned(), (uid, lineage))
                })
                .collect(),
            Err(e) => {
                errors.push(error(SCHEMA_FILE, render(&e)));
                HashMap::new()
            }
        };

        if !errors.is_empty() {
            return Err(errors);
        }
        let Some(entities) = entities else {
            return Err(errors);
        };
        let index = crate::index::PolicyIndex::new(&policies);
        let mut policy_files: Vec<String> = origin.values().cloned().collect();
        policy_files.sort_unstable();
        policy_files.dedup();
        // Every policy of the set was given its file as it was added.
        let file_of_policy = index
            .ids()
            .map(|id| {
                origin
                    .get(id)
                    .and_then(|file| policy_files.binary_search(file).ok())
                    .and_then(|place| u32::try_from(place).ok())
                    .unwrap_or(u32::MAX)
            })
            .collect();
        let mut files = files;
        if schema_source == SchemaSource::BuiltIn {
            // The hash names what decides: a binary with another built-in schema is another set.
            files.insert(
                format!("(built-in) {SCHEMA_FILE}"),
                BUILTIN_SCHEMA.to_owned(),
            );
        }
        Ok(Self {
            schema,
            policy_count: policies.policies().count(),
            index,
            entities,
            action_lineage,
            approval_required,
            scopes,
            tool_arguments,
            hash: content_hash(&files),
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            validated_shapes: crate::engine::ValidatedShapes::default(),
            warnings,
            schema_source,
            policy_files: policy_files.into_boxed_slice(),
            file_of_policy,
        })
    }

    /// Every policy id with the file (relative to the directory) that holds it, by file name
    /// and then id.
    pub fn policy_files(&self) -> Vec<(String, String)> {
        let mut listed: Vec<(&str, &str)> = self
            .index
            .ids()
            .zip(self.file_of_policy.iter())
            .map(|(id, &file)| (self.file_name(file), id))
            .collect();
        listed.sort_unstable();
        listed
            .into_iter()
            .map(|(file, id)| (id.to_owned(), file.to_owned()))
            .collect()
    }

    fn file_name(&self, file: u32) -> &str {
        self.policy_files
            .get(file as usize)
            .map_or("", String::as_str)
    }

    /// The hash [`PolicySnapshot::load`] would give `dir`, without parsing anything: a cheap
    /// way to tell whether a reload has anything to do.
    pub fn fingerprint(dir: &Path) -> Result<String, Vec<LoadError>> {
        read_dir(dir).map(|mut files| {
            if !files.contains_key(SCHEMA_FILE) {
                files.insert(
                    format!("(built-in) {SCHEMA_FILE}"),
                    BUILTIN_SCHEMA.to_owned(),
                );
            }
            content_hash(&files)
        })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }
}

/// SHA-256 over every file's name and content, length-prefixed so no two sets collide by
/// concatenation.
fn content_hash(files: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    for (name, src) in files {
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update((src.len() as u64).to_be_bytes());
        hasher.update(src.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The directory's relevant files, by name, sorted (so the hash is stable).
fn read_dir(dir: &Path) -> Result<BTreeMap<String, String>, Vec<LoadError>> {
    let dir_error = |message: String| vec![error(&dir.display().to_string(), message)];
    let entries = std::fs::read_dir(dir).map_err(|e| dir_error(e.to_string()))?;
    let mut files = BTreeMap::new();
    let mut errors = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| dir_error(e.to_string()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Kubernetes ConfigMap volumes hold `..data` and `..<timestamp>` entries beside the
        // visible symlinks; only the visible names are policy files.
        let relevant = name == SCHEMA_FILE || name == ENTITIES_FILE || name.ends_with(".cedar");
        if !relevant || name.starts_with('.') {
            continue;
        }
        match std::fs::read_to_string(entry.path()) {
            Ok(src) => {
                files.insert(name, src);
            }
            Err(e) => errors.push(error(&name, e.to_string())),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors)
    }
}

/// Parses entities.json. Attributes of `Agent` and `User` entries are computed by the proxy
/// for every request (from the certificate and the token), so the file only declares their
/// memberships: the attributes the schema requires are filled in here before validation, and
/// an `Agent` id must be a valid SPIFFE ID. A `Route`'s `path`, `host` and `method` are the
/// request's as well (filled in here the same way); other attributes a schema gives routes,
/// and every attribute and tag of the other entities, are the file's and reach Cedar.
/// Tags of the computed entities would not, so they are refused rather than ignored.
fn entities_from_json(src: &str, schema: &Schema) -> Result<Entities, Vec<String>> {
    let mut value: serde_json::Value =
        serde_json::from_str(src).map_err(|e| vec![format!("not valid JSON: {e}")])?;
    let Some(list) = value.as_array_mut() else {
        return Err(vec!["must be a JSON array of entities".to_owned()]);
    };
    let mut errors = Vec::new();
    for (index, entity) in list.iter_mut().enumerate() {
        let kind = entity["uid"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let id = entity["uid"]["id"].as_str().unwrap_or_default().to_owned();
        if matches!(kind.as_str(), "Agent" | "User" | "Route")
            && entity
                .get("tags")
                .is_some_and(|t| t.as_object().is_none_or(|t| !t.is_empty()))
        {
            errors.push(format!(
                "entity {index} ({kind} {id:?}): a {kind} is built from the request, it cannot carry tags"
            ));
            continue;
        }
        if kind == "Route" {
            if let Some(object) = entity.as_object_mut() {
                let attrs = object
                    .entry("attrs")
                    .or_insert_with(|| serde_json::json!({}));
                match attrs.as_object_mut() {
                    Some(attrs) if ROUTE_ATTRS.iter().any(|name| attrs.contains_key(*name)) => {
                        errors.push(format!(
                            "entity {index} (Route {id:?}): path, host and method of a Route come from the request, declare only its other attributes and parents"
                        ));
                    }
                    Some(attrs) => {
                        // Placeholders for validation; each request's own values replace them.
                        for name in ROUTE_ATTRS {
                            attrs.insert(name.to_owned(), serde_json::json!(""));
                        }
                    }
                    // Not an object: the schema's validation below says what is wrong.
                    None => {}
                }
            }
            continue;
        }
        let computed = match kind.as_str() {
            "Agent" => match SpiffeId::parse(&id) {
                Ok(spiffe) => agent_attrs_json(&spiffe),
                Err(e) => {
                    errors.push(format!("entity {index}: Agent id {id:?}: {e}"));
                    continue;
                }
            },
            "User" => serde_json::json!({ "issuer": "", "scopes": [] }),
            _ => {
                // Groups usually have no attributes; let the file omit the empty map.
                if let Some(object) = entity.as_object_mut() {
                    object
                        .entry("attrs")
                        .or_insert_with(|| serde_json::json!({}));
                }
                continue;
            }
        };
        let Some(object) = entity.as_object_mut() else {
            continue;
        };
        if object
            .get("attrs")
            .is_some_and(|a| a.as_object().is_some_and(|a| !a.is_empty()))
        {
            errors.push(format!(
                "entity {index} ({kind} {id:?}): attributes of {kind} come from the request, declare only parents"
            ));
            continue;
        }
        object.insert("attrs".to_owned(), computed);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Entities::from_json_value(value, Some(schema)).map_err(|e| vec![render(&e)])
}

/// The attributes of a `Route` taken from each request.
const ROUTE_ATTRS: [&str; 3] = ["path", "host", "method"];

pub(crate) fn agent_attrs_json(id: &SpiffeId) -> serde_json::Value {
    let mut attrs = serde_json::json!({
        "trust_domain": id.trust_domain_name(),
        "path": id.path(),
    });
    if let Some((namespace, service_account)) = id.kubernetes_service_account() {
        attrs["namespace"] = namespace.into();
        attrs["service_account"] = service_account.into();
    }
    attrs
}

/// The entity types of the shipped schema, parsed once: parsing a type name runs Cedar's
/// parser, which cost more than the rest of building a request's entities.
static KNOWN_TYPES: LazyLock<HashMap<&'static str, EntityTypeName>> = LazyLock::new(|| {
    [
        "Agent",
        "AgentGroup",
        "User",
        "Group",
        "Action",
        "Route",
        "Model",
        "ModelGroup",
        "Tool",
        "ToolGroup",
        "McpResource",
        "Prompt",
    ]
    .into_iter()
    .filter_map(|name| Some((name, EntityTypeName::from_str(name).ok()?)))
    .collect()
});

pub(crate) fn entity_uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let kind = match KNOWN_TYPES.get(kind) {
        Some(kind) => kind.clone(),
        None => EntityTypeName::from_str(kind).map_err(|e| e.to_string())?,
    };
    Ok(EntityUid::from_type_name_and_id(
        kind,
        cedar_policy::EntityId::new(id),
    ))
}

/// Bounds on a policy's (or the schema's) shape, checked on the text before Cedar parses
/// it. Cedar's parser and validator recurse once per level of an expression, with large
/// frames, and a stack overflow aborts the whole process: on a 2 MiB thread stack (a
/// reload's) ~130 nested parentheses, ~150 nested set or record literals, ~3,000 nested
/// `if`s or ~100,000 chained comparisons did, so one bad file in the policy directory would
/// take down every sidecar that loads it. A file over a bound is refused before Cedar sees
/// it (a reload keeps the last good set). Each bound is far above what written policies
/// use, and at each of them Cedar needs under 1 MiB of stack in a release build.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShapeBounds {
    /// `(`, `[` and `{` nested.
    pub(crate) nesting: usize,
    /// `if` expressions in one policy (nested or not: their nesting has no closing token).
    pub(crate) conditionals: usize,
    /// Binary operators in one policy (`&&`, `==`, `+`, `in`, ...).
    pub(crate) operators: usize,
}

pub(crate) const SHAPE_BOUNDS: ShapeBounds = ShapeBounds {
    nesting: 32,
    conditionals: 100,
    operators: 10_000,
};

/// Which bound a file is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OverBound {
    Nesting,
    Conditionals,
    Operators,
}

/// The error for a file over one of [`SHAPE_BOUNDS`], located where it first is.
fn over_bounds(file: &str, src: &str) -> Option<LoadError> {
    let (offset, which) = first_over_bounds(src, SHAPE_BOUNDS)?;
    let ShapeBounds {
        nesting,
        conditionals,
        operators,
    } = SHAPE_BOUNDS;
    let what = match which {
        OverBound::Nesting => {
            format!("brackets (`(`, `[`, `{{`) nest deeper than {nesting} levels")
        }
        OverBound::Conditionals => {
            format!("a policy has more than {conditionals} `if` expressions")
        }
        OverBound::Operators => format!(
            "a policy has more than {operators} operators (a long `||` of equalities is a set: `in [...]`)"
        ),
    };
    let message =
        format!("{what}; refused before parsing, as Cedar's parser would exhaust its stack");
    Some(match line_column(src, offset) {
        Some((line, column)) => error(&format!("{file}:{line}:{column}"), message),
        None => error(file, message),
    })
}

/// The byte offset where `src` first goes over a bound, and which. A lexical scan of Cedar
/// (policies and schemas share its lexemes): string literals and `//` comments are skipped,
/// a policy ends at a `;` outside brackets. Unbalanced closing brackets are the parser's to
/// report. `-` and `<`/`>` count as operators wherever they are (negation, `Set<...>`): the
/// count is an upper bound.
pub(crate) fn first_over_bounds(src: &str, bounds: ShapeBounds) -> Option<(usize, OverBound)> {
    let bytes = src.as_bytes();
    let (mut depth, mut conditionals, mut operators) = (0usize, 0usize, 0usize);
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        let next = bytes.get(at + 1).copied();
        let start = at;
        at += 1;
        match byte {
            b'"' => {
                while let Some(&byte) = bytes.get(at) {
                    at += if byte == b'\\' { 2 } else { 1 };
                    if byte == b'"' {
                        break;
                    }
                }
            }
            b'/' if next == Some(b'/') => {
                while bytes.get(at).is_some_and(|&byte| byte != b'\n') {
                    at += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > bounds.nesting {
                    return Some((start, OverBound::Nesting));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => (conditionals, operators) = (0, 0),
            b'&' | b'|' | b'=' | b'!' | b'<' | b'>' | b'+' | b'-' | b'*' => {
                // Two-byte operators (`&&`, `==`, `<=`, ...) are one; a lone `!` is unary.
                if matches!(
                    (byte, next),
                    (b'&', Some(b'&')) | (b'|', Some(b'|')) | (_, Some(b'='))
                ) {
                    at += 1;
                } else if byte == b'!' {
                    continue;
                }
                operators += 1;
                if operators > bounds.operators {
                    return Some((start, OverBound::Operators));
                }
            }
            byte if byte == b'_' || byte.is_ascii_alphabetic() => {
                while bytes
                    .get(at)
                    .is_some_and(|&byte| byte == b'_' || byte.is_ascii_alphanumeric())
                {
                    at += 1;
                }
                match &bytes[start..at] {
                    b"if" => {
                        conditionals += 1;
                        if conditionals > bounds.conditionals {
                            return Some((start, OverBound::Conditionals));
                        }
                    }
                    b"in" | b"has" | b"like" | b"is" => {
                        operators += 1;
                        if operators > bounds.operators {
                            return Some((start, OverBound::Operators));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    None
}

fn error(file: &str, message: impl Into<String>) -> LoadError {
    LoadError {
        file: file.to_owned(),
        message: message.into(),
    }
}

/// Cedar's error with its causes and help, on one line (errors are listed one per line).
fn render<E: miette::Diagnostic + ?Sized>(e: &E) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(help) = e.help() {
        out.push_str(" (help: ");
        out.push_str(&help.to_string());
        out.push(')');
    }
    out.replace('\n', " ")
}

/// `render(e)` tied to `file:line:column` when Cedar points at a place in `src`.
fn located(file: &str, src: &str, e: &(impl miette::Diagnostic + ?Sized)) -> LoadError {
    let offset = e
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    match offset.and_then(|offset| line_column(src, offset)) {
        Some((line, column)) => error(&format!("{file}:{line}:{column}"), render(e)),
        None => error(file, render(e)),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `src`.
pub(crate) fn line_column(src: &str, offset: usize) -> Option<(usize, usize)> {
    let before = src.get(..offset)?;
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Some((line, before[line_start..].chars().count() + 1))
}

fn first_line(s: &str) -> String {
    let line = s
        .lines()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('@'));
    line.unwrap_or(s).trim().chars().take(80).collect()
}

//! The audit record as one JSON object, written by hand: the same bytes `serde_json` writes
//! for the derived `Serialize` of [`AuditRecord`] (field order, `null`s, skipped fields,
//! escapes), at a fraction of the cost.
//!
//! Every request writes one record of some thirty fields, and `serde_json` scans each key
//! and each string byte by byte for characters to escape. Here keys are literals and a
//! string is copied whole once a pass over it, eight bytes at a time, finds nothing to
//! escape (ids, hashes and times never need one, paths and names rarely); a string that does
//! need escaping, and the rare nested values (`shadow`, batch `calls`, `approval`, a
//! protocol's `context`), are still written by `serde_json`, so escaping and number
//! formatting stay its own. A test compares the two over generated records.

use portcullis_core::UserClaims;
use serde::Serialize;

use super::{AuditInput, AuditPolicies, AuditRecord, AuditUser, SharedText};

/// A field's key as the writer copies it: `,"key":` and, for a string value, `,"key":"` with
/// the value's opening quote. Made from a literal by [`key!`], so each is one copy of a
/// length known where it is written.
#[derive(Clone, Copy)]
struct Key {
    plain: &'static str,
    quoted: &'static str,
}

/// The [`Key`] of a literal field name (one JSON needs no escapes in: the test against
/// `serde_json` would show one that did).
macro_rules! key {
    ($name:literal) => {
        Key {
            plain: concat!(",\"", $name, "\":"),
            quoted: concat!(",\"", $name, "\":\""),
        }
    };
}

/// Appends `record` as a JSON object (no newline).
pub(super) fn write_record(buf: &mut Vec<u8>, record: &AuditRecord) {
    let mut o = Object::open(buf);
    o.str(key!("time"), &record.time);
    o.shared(key!("request_id"), &record.request_id);
    match &record.trace_id {
        Some(trace_id) => o.shared(key!("trace_id"), trace_id),
        None => o.opt_str(key!("trace_id"), None),
    }
    o.str(key!("client_address"), &record.client_address);
    o.opt_str(key!("agent"), record.agent.as_deref());
    o.key(key!("user"));
    match &record.user {
        None => o.buf.extend_from_slice(b"null"),
        Some(AuditUser(user)) => {
            let mut u = Object::open(o.buf);
            u.str(key!("sub"), &user.subject);
            u.str(key!("iss"), &user.issuer);
            u.close();
        }
    }
    o.strs(key!("actor_chain"), record.actor_chain.as_slice());
    o.str(key!("method"), &record.method);
    o.str(key!("path"), &record.path);
    o.opt_str(key!("action"), record.action);
    o.key(key!("resource"));
    match &record.resource {
        None => o.buf.extend_from_slice(b"null"),
        Some(resource) => {
            let mut r = Object::open(o.buf);
            r.str(key!("type"), resource.kind);
            r.str(key!("id"), &resource.id);
            r.close();
        }
    }
    o.opt_str(key!("decision"), record.decision);
    o.opt_str(key!("reason"), record.reason);
    o.key(key!("policies"));
    policies(o.buf, &record.policies);
    o.strs(key!("errors"), &record.errors);
    o.opt_str(key!("policy_hash"), record.policy_hash.as_deref());
    o.str(key!("mode"), record.mode);
    o.serde(key!("status"), &record.status);
    o.serde(key!("decision_us"), &record.decision_us);
    o.serde(key!("duration_ms"), &record.duration_ms);
    o.serde(key!("completed"), &record.completed);
    o.strs(key!("standing_credentials"), &record.standing_credentials);
    if let Some(input) = &record.input {
        o.key(key!("input"));
        question(o.buf, record, input);
    }
    if let Some(shadow) = &record.shadow {
        o.serde(key!("shadow"), shadow);
    }
    if !record.calls.is_empty() {
        o.serde(key!("calls"), &record.calls);
    }
    if let Some(approval) = &record.approval {
        o.serde(key!("approval"), approval);
    }
    if let Some(credential) = record.credential {
        o.str(key!("credential"), credential);
    }
    o.close();
}

fn policies(buf: &mut Vec<u8>, policies: &AuditPolicies) {
    let mut p = Object::open(buf);
    p.strs(key!("agent"), &policies.agent);
    match &policies.user {
        None => p.opt_str(key!("user"), None),
        Some(user) => p.strs(key!("user"), user),
    }
    p.close();
}

/// [`AuditRecord::question`], as `Question`'s derived `Serialize` writes it (absent fields
/// skipped).
fn question(buf: &mut Vec<u8>, record: &AuditRecord, input: &AuditInput) {
    let mut o = Object::open(buf);
    o.str(key!("agent"), record.agent.as_deref().unwrap_or_default());
    if let Some(user) = &input.user {
        o.key(key!("user"));
        user_spec(o.buf, user);
    }
    o.str(key!("method"), &record.method);
    o.str(key!("path"), &record.path);
    o.some_str(key!("action"), record.action);
    if let Some(resource) = &record.resource {
        o.key(key!("resource"));
        entity(o.buf, resource.kind, &resource.id);
    }
    o.str(key!("host"), &input.host);
    if let Some(context) = &input.context {
        o.serde(key!("context"), context);
    }
    o.serde(key!("now"), &input.now);
    o.str(key!("client_address"), &record.client_address);
    o.close();
}

/// `Type::"id"` (`portcullis_core::entity_text`) as a JSON string. Written in place when
/// the id is printable ASCII without quotes or backslashes, where the only escapes are
/// the two quotes around the id; otherwise made as text first.
fn entity(buf: &mut Vec<u8>, kind: &str, id: &str) {
    if printable(kind.as_bytes()) && printable(id.as_bytes()) {
        buf.reserve(kind.len() + id.len() + 8);
        buf.push(b'"');
        buf.extend_from_slice(kind.as_bytes());
        buf.extend_from_slice(b"::\\\"");
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(b"\\\"\"");
    } else {
        string(buf, &portcullis_core::entity_text(kind, id));
    }
}

/// [`portcullis_policy::tools::UserSpec::from_claims`] as its derived `Serialize` writes it
/// (a verified user has no `scope` string: its scopes are the set).
fn user_spec(buf: &mut Vec<u8>, user: &UserClaims) {
    let mut o = Object::open(buf);
    o.str(key!("sub"), &user.subject);
    o.str(key!("iss"), &user.issuer);
    if !user.scopes.is_empty() {
        o.strs(key!("scopes"), &user.scopes);
    }
    o.some_str(key!("email"), user.email.as_deref());
    if !user.groups.is_empty() {
        o.strs(key!("groups"), &user.groups);
    }
    o.close();
}

/// A JSON object being written. Every field is written with a leading `,`; closing turns the
/// first field's into the `{` (an object without fields is `{}`), so no field asks whether
/// it is the first.
struct Object<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Object<'a> {
    fn open(buf: &'a mut Vec<u8>) -> Self {
        let start = buf.len();
        Self { buf, start }
    }

    #[inline(always)]
    fn key(&mut self, key: Key) {
        self.buf.extend_from_slice(key.plain.as_bytes());
    }

    #[inline(always)]
    fn str(&mut self, key: Key, value: &str) {
        if needs_escape(value.as_bytes()) {
            self.key(key);
            let _ = serde_json::to_writer(&mut *self.buf, value);
        } else {
            // Key, opening quote, value, closing quote: two copies and a byte.
            self.buf.extend_from_slice(key.quoted.as_bytes());
            self.buf.extend_from_slice(value.as_bytes());
            self.buf.push(b'"');
        }
    }

    /// A [`SharedText`], copied from its bytes (no UTF-8 check: it holds UTF-8 since it was
    /// made; its ids are 32 hex digits).
    #[inline(always)]
    fn shared(&mut self, key: Key, value: &SharedText) {
        let bytes = value.as_bytes();
        if needs_escape(bytes) {
            self.key(key);
            let _ = serde_json::to_writer(&mut *self.buf, value.as_str());
        } else {
            self.buf.extend_from_slice(key.quoted.as_bytes());
            self.buf.extend_from_slice(bytes);
            self.buf.push(b'"');
        }
    }

    /// `null` when absent (a field the record always has).
    #[inline(always)]
    fn opt_str(&mut self, key: Key, value: Option<&str>) {
        match value {
            Some(value) => self.str(key, value),
            None => {
                self.key(key);
                self.buf.extend_from_slice(b"null");
            }
        }
    }

    /// Left out when absent (`skip_serializing_if = "Option::is_none"`).
    #[inline(always)]
    fn some_str(&mut self, key: Key, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    fn strs(&mut self, key: Key, values: &[impl AsRef<str>]) {
        self.key(key);
        self.buf.push(b'[');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            string(self.buf, value.as_ref());
        }
        self.buf.push(b']');
    }

    /// Numbers, booleans and the rare nested values, as `serde_json` writes them.
    fn serde(&mut self, key: Key, value: &impl Serialize) {
        self.key(key);
        let start = self.buf.len();
        if serde_json::to_writer(&mut *self.buf, value).is_err() {
            // Not expected: nothing audited has a map with non-string keys. The line stays
            // valid JSON.
            self.buf.truncate(start);
            self.buf.extend_from_slice(b"null");
        }
    }

    fn close(self) {
        if self.buf.len() == self.start {
            self.buf.extend_from_slice(b"{}");
        } else {
            self.buf[self.start] = b'{';
            self.buf.push(b'}');
        }
    }
}

/// A JSON string. Copied as it is when nothing in it needs escaping ([`needs_escape`]);
/// otherwise written by `serde_json`.
fn string(buf: &mut Vec<u8>, value: &str) {
    if needs_escape(value.as_bytes()) {
        let _ = serde_json::to_writer(&mut *buf, value);
    } else {
        buf.reserve(value.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    }
}

/// Whether any byte is one JSON escapes: `"`, `\` or a control character below 0x20
/// (`serde_json` leaves DEL and everything above 0x7f as it is).
fn needs_escape(bytes: &[u8]) -> bool {
    any_byte(bytes, escapes)
}

/// Whether every byte is printable ASCII (0x20 to 0x7e) and none is one JSON escapes: text
/// that Cedar's entity syntax and JSON both leave as it is.
fn printable(bytes: &[u8]) -> bool {
    !any_byte(bytes, |word| escapes(word) | at_least_del(word))
}

/// Whether `test` finds a byte in `bytes`, eight bytes at a time, the last eight overlapping
/// the others when the length is not a multiple of eight, and fewer than eight padded with
/// `a` (which no test looks for): the record's strings are mostly 3 to 64 bytes long, too
/// short for a vectorized pass to leave its byte-by-byte tail behind (`write_record`: 3,677
/// instructions a request with that pass, 3,376 with this one; benches/instructions/run.sh,
/// 2026-12-07).
#[inline(always)]
fn any_byte(bytes: &[u8], test: impl Fn(u64) -> u64) -> bool {
    if bytes.len() < 8 {
        let mut word = [b'a'; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        return test(u64::from_le_bytes(word)) != 0;
    }
    let (words, _) = bytes.as_chunks::<8>();
    let mut found = words
        .iter()
        .fold(0, |found, word| found | test(u64::from_le_bytes(*word)));
    if let Some(last) = bytes.last_chunk::<8>() {
        found |= test(u64::from_le_bytes(*last));
    }
    found != 0
}

/// Non-zero when a byte of `word` is DEL (0x7f) or above: the high bit set, or set by adding
/// one (a carry into the next byte comes only from a byte that is above 0x7f itself).
#[inline(always)]
fn at_least_del(word: u64) -> u64 {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    (word.wrapping_add(ONES) | word) & HIGH
}

/// Non-zero when a byte of `word` needs escaping (the "has less" and "has zero" tests of Bit
/// Twiddling Hacks, each exact for whether any byte matches).
#[inline(always)]
fn escapes(word: u64) -> u64 {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // A byte below `n` (n <= 0x80) sets its high bit here, and none is set without one.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    below(word, 0x20)
        | below(word ^ (ONES * u64::from(b'"')), 1)
        | below(word ^ (ONES * u64::from(b'\\')), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::audit::{ActorChain, AuditApproval, AuditCall, AuditResource};
    use crate::shadow::ShadowOutcome;

    /// Strings that exercise every escape and none.
    fn text(rng: &mut fastrand::Rng) -> String {
        const PIECES: [&str; 16] = [
            "spiffe://prod.example.org/ns/team0/sa/agent",
            "/v1/chat/completions",
            "a",
            "",
            "\"",
            "\\",
            "\n",
            "\t\r\u{8}\u{c}",
            "\u{1}\u{1f}",
            "\u{7f}",
            "é",
            "模型",
            "🦀",
            "Route::\"/x\"",
            " ",
            "0123456789abcdef",
        ];
        (0..rng.usize(0..4))
            .map(|_| PIECES[rng.usize(..PIECES.len())])
            .collect()
    }

    fn maybe<T>(rng: &mut fastrand::Rng, f: impl FnOnce(&mut fastrand::Rng) -> T) -> Option<T> {
        rng.bool().then(|| f(rng))
    }

    fn texts(rng: &mut fastrand::Rng) -> Vec<String> {
        (0..rng.usize(0..3)).map(|_| text(rng)).collect()
    }

    fn policies(rng: &mut fastrand::Rng) -> AuditPolicies {
        AuditPolicies {
            agent: texts(rng).into(),
            user: maybe(rng, |rng| texts(rng).into()),
        }
    }

    fn claims(rng: &mut fastrand::Rng) -> Arc<UserClaims> {
        Arc::new(UserClaims {
            subject: text(rng),
            issuer: text(rng),
            scopes: texts(rng),
            email: maybe(rng, text),
            groups: texts(rng),
            actor_chain: texts(rng),
            expires_at: rng.u64(..),
        })
    }

    fn static_text(rng: &mut fastrand::Rng) -> &'static str {
        ["allow", "deny", "GET", "x-api-key", "a\"b", "\n"][rng.usize(..6)]
    }

    fn input(rng: &mut fastrand::Rng) -> AuditInput {
        AuditInput {
            user: maybe(rng, claims),
            host: text(rng).into(),
            context: maybe(rng, |rng| {
                let mut map = serde_json::Map::new();
                map.insert(
                    text(rng),
                    serde_json::json!({"name": text(rng), "stream": rng.bool(), "n": rng.i64(..)}),
                );
                Box::new(map)
            }),
            now: rng.i64(..),
        }
    }

    /// What `serde_json` writes for the record with its `input` as the whole question,
    /// where the derive puts it: after `standing_credentials`, the last field every record
    /// has (the fields after it are written the same with or without the question).
    fn reference(record: &AuditRecord) -> Vec<u8> {
        let mut json = serde_json::to_vec(record).unwrap();
        if let Some(question) = record.question() {
            let head = AuditRecord {
                shadow: None,
                calls: Vec::new(),
                approval: None,
                credential: None,
                ..record.clone()
            };
            let at = serde_json::to_vec(&head).unwrap().len() - 1;
            let mut field = b",\"input\":".to_vec();
            field.extend(serde_json::to_vec(&question).unwrap());
            json.splice(at..at, field);
        }
        json
    }

    fn record(rng: &mut fastrand::Rng) -> AuditRecord {
        AuditRecord {
            time: text(rng),
            request_id: text(rng).into(),
            trace_id: maybe(rng, |rng| text(rng).into()),
            client_address: text(rng).into(),
            agent: maybe(rng, |rng| text(rng).into()),
            user: maybe(rng, |rng| AuditUser(claims(rng))),
            actor_chain: ActorChain(maybe(rng, claims)),
            method: text(rng).into(),
            path: text(rng).into(),
            action: maybe(rng, static_text),
            resource: maybe(rng, |rng| AuditResource {
                kind: static_text(rng),
                id: text(rng).into(),
            }),
            decision: maybe(rng, static_text),
            reason: maybe(rng, static_text),
            policies: policies(rng),
            errors: texts(rng),
            policy_hash: maybe(rng, |rng| text(rng).into()),
            mode: static_text(rng),
            status: rng.u16(..),
            decision_us: maybe(rng, |rng| rng.u64(..)),
            duration_ms: [0.0, 0.507, 1.0, 12345.678, 1e-7, f64::NAN][rng.usize(..6)],
            completed: rng.bool(),
            standing_credentials: (0..rng.usize(0..3)).map(|_| static_text(rng)).collect(),
            input: maybe(rng, input),
            shadow: maybe(rng, |rng| {
                Box::new(ShadowOutcome {
                    decision: static_text(rng),
                    disagreement: maybe(rng, static_text),
                    policies: policies(rng),
                    errors: texts(rng),
                    policy_hash: text(rng),
                })
            }),
            calls: (0..rng.usize(0..3))
                .map(|_| AuditCall {
                    action: static_text(rng),
                    resource: AuditResource {
                        kind: static_text(rng),
                        id: text(rng).into(),
                    },
                    decision: static_text(rng),
                    policies: policies(rng),
                    input: None,
                })
                .collect(),
            approval: maybe(rng, |rng| {
                Box::new(AuditApproval {
                    digest: text(rng),
                    approver: maybe(rng, text),
                    issuer: maybe(rng, text),
                    jti: maybe(rng, text),
                })
            }),
            credential: maybe(rng, static_text),
        }
    }

    #[test]
    fn writes_the_bytes_serde_json_writes() {
        let mut rng = fastrand::Rng::with_seed(17);
        let mut buf = Vec::new();
        for case in 0..5_000 {
            let record = record(&mut rng);
            buf.clear();
            write_record(&mut buf, &record);
            let expected = reference(&record);
            assert_eq!(
                String::from_utf8_lossy(&buf),
                String::from_utf8_lossy(&expected),
                "case {case}: {record:?}"
            );
        }
    }

    #[test]
    fn a_default_record_and_a_served_one_match_too() {
        let served = AuditRecord {
            time: "2026-12-05T05:14:28.752Z".into(),
            request_id: "a5a8bc92225e9fd01cf7a47930dd31ee".into(),
            agent: Some("spiffe://prod.example.org/ns/team0/sa/agent".into()),
            method: "GET".into(),
            path: "/bench/1k".into(),
            action: Some("GET"),
            resource: Some(AuditResource {
                kind: "Route",
                id: "/bench/1k".into(),
            }),
            decision: Some("allow"),
            input: Some(AuditInput {
                host: "127.0.0.1".into(),
                now: 1_796_457_674,
                ..AuditInput::default()
            }),
            ..AuditRecord::default()
        };
        for record in [AuditRecord::default(), served] {
            let mut buf = Vec::new();
            write_record(&mut buf, &record);
            assert_eq!(buf, reference(&record));
        }
    }

    #[test]
    fn escapes_are_found_wherever_they_are() {
        for len in 1..40 {
            for filler in [b'a', b' ', 0x7f, 0x80, 0xff, b'#', b']'] {
                for special in [b'"', b'\\', b'\n', 0x00, 0x1f] {
                    for at in 0..len {
                        let mut bytes = vec![filler; len];
                        bytes[at] = special;
                        assert!(needs_escape(&bytes), "{special:#x} at {at} of {len}");
                    }
                }
            }
        }
        // Every byte value alone, at every place of strings shorter and longer than a word.
        for byte in 0..=255u8 {
            let escaped = byte < 0x20 || byte == b'"' || byte == b'\\';
            for len in [1, 5, 8, 12] {
                for at in 0..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = byte;
                    assert_eq!(needs_escape(&bytes), escaped, "{byte:#x} at {at} of {len}");
                }
            }
        }
        assert!(!needs_escape(
            "plain ascii, DEL \u{7f}, é 模型 🦀".as_bytes()
        ));
        assert!(!needs_escape(b""));
    }

    /// `entity`'s test for text it writes in place: printable ASCII and no JSON escape.
    #[test]
    fn printable_is_exactly_visible_ascii_and_space_less_quote_and_backslash() {
        for byte in 0..=255u8 {
            let expected = (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\';
            for filler in [b'a', b' ', b'~'] {
                for len in [1, 3, 7, 8, 9, 16, 23] {
                    for at in 0..len {
                        let mut bytes = vec![filler; len];
                        bytes[at] = byte;
                        assert_eq!(printable(&bytes), expected, "{byte:#x} at {at} of {len}");
                    }
                }
            }
        }
        assert!(printable(b""));
        assert!(printable(b"spiffe://prod.example.org/ns/team0/sa/agent"));
        assert!(!printable("/caf\u{e9}".as_bytes()));
    }
}

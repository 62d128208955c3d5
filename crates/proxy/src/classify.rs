//! From an HTTP request to the Cedar vocabulary: which action, on which resource.

use std::borrow::Cow;
use std::sync::Arc;

use portcullis_core::{Action, Resource};

use crate::error::Refusal;

/// How a matched route's requests are understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Generic HTTP: action = method (in `read`/`write`), resource = `Route::"<path>"`.
    Http,
    /// OpenAI-compatible inference endpoints: `invoke_model` on `Model::"<body.model>"`
    /// (see `protocol::openai`); the route's other paths are generic.
    OpenAi,
    /// MCP over Streamable HTTP: one Cedar call per JSON-RPC message (see `protocol::mcp`).
    Mcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// One entry of `routes`; the first match wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub matcher: PathMatch,
    pub protocol: Protocol,
    /// Whether the user's token is passed on to the upstream (by default it is removed: the
    /// application gets `x-portcullis-user`, not a bearer credential it could replay).
    pub forward_user_token: bool,
    /// Inspection limit for this route's bodies (`routes[].body_limit`); `None` uses
    /// `limits.body_prefix_bytes`.
    pub body_limit: Option<usize>,
    /// `routes[].match_case: insensitive`: the path is matched ASCII case-insensitively and
    /// the Cedar `Route` id is the lower-cased path, for applications that route
    /// case-insensitively (Express by default), so `/ADMIN` meets the policies on `/admin`.
    pub case_insensitive: bool,
    /// What the sidecar attaches upstream after a permit (`routes[].credential`).
    pub credential: Option<crate::credential::CredentialSpec>,
}

impl RouteRule {
    fn matches(&self, path: &str) -> bool {
        let (pattern, exact) = match &self.matcher {
            PathMatch::Exact(exact) => (exact.as_str(), true),
            PathMatch::Prefix(prefix) => (prefix.as_str(), false),
        };
        // An exact route covers its path with one `/` added (`/mcp/` for `/mcp`): most
        // routers (Express, Starlette's redirect) serve both as one endpoint, and a request
        // to the other spelling must not leave the route's protocol, inspection, session
        // binding and credentials behind.
        if exact
            && path.len() != pattern.len()
            && !(path.len() == pattern.len() + 1 && path.ends_with('/') && !pattern.ends_with('/'))
        {
            return false;
        }
        match path.get(..pattern.len()) {
            Some(head) if self.case_insensitive => head.eq_ignore_ascii_case(pattern),
            Some(head) => head == pattern,
            None => false,
        }
    }
}

/// The classified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub action: Action,
    pub resource: Resource,
    pub protocol: Protocol,
    pub forward_user_token: bool,
    pub body_limit: Option<usize>,
    /// Index of the matched entry of `routes`, if any.
    pub route: Option<usize>,
}

/// Classifies a request whose path already passed [`check_path`]. Unmatched paths are generic
/// HTTP routes.
pub fn classify(
    routes: &[RouteRule],
    method: Cow<'static, str>,
    path: &Arc<str>,
    host: &Arc<str>,
) -> Result<Classified, Refusal> {
    let index = routes.iter().position(|route| route.matches(path));
    let route = index.and_then(|index| routes.get(index));
    let protocol = route.map_or(Protocol::Http, |route| route.protocol);
    let forward_user_token = route.is_some_and(|route| route.forward_user_token);
    let body_limit = route.and_then(|route| route.body_limit);
    let path = if route.is_some_and(|route| route.case_insensitive) {
        path.to_ascii_lowercase().into()
    } else {
        path.clone()
    };
    match protocol {
        // Protocol routes start as the generic call; `protocol::inspect` refines it from the
        // body (and refuses methods their transport does not define).
        Protocol::Http | Protocol::OpenAi | Protocol::Mcp => {
            let action = Action::for_method(&method).ok_or(Refusal::UnsupportedMethod)?;
            Ok(Classified {
                action,
                resource: Resource::Route {
                    path,
                    host: host.clone(),
                    method,
                },
                protocol,
                forward_user_token,
                body_limit,
                route: index,
            })
        }
    }
}

/// Refuses paths that the application might read differently from the policy.
///
/// Policies match the path as sent. If the application then removed dot segments, merged
/// slashes or decoded `%2F`, `/api/../admin` would pass a `forbid` on `/admin*` and reach
/// `/admin`. Rather than guess the application's normalisation, such paths are refused: dot
/// segments (RFC 3986 §5.2.4), empty segments, backslashes, and percent-encoded unreserved
/// characters, `/` or `\` (RFC 3986 §6.2.2.2: encoded unreserved characters are equivalent
/// to the characters themselves). Also any `;`: Tomcat, Jetty and Spring strip a segment's
/// path parameters (`/admin;x/users` is `/admin/users` to them, and `..;` a dot segment),
/// so a policy on `/admin/*` would not see the path they serve; and an encoded NUL or other
/// control character (C servers end the path at a NUL, others strip controls).
pub fn check_path(path: &str) -> Result<(), Refusal> {
    // One pass, segment by segment (a percent-encoded triple never spans a `/`, which is not
    // a hex digit).
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Refusal::AmbiguousPath);
    };
    let mut segments = rest.as_bytes().split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        // An empty segment is refused except the last (a trailing slash).
        let empty_inside = segment.is_empty() && segments.peek().is_some();
        if empty_inside || segment == b"." || segment == b".." {
            return Err(Refusal::AmbiguousPath);
        }
        let mut i = 0;
        while let Some(&byte) = segment.get(i) {
            match byte {
                b'\\' | b';' => return Err(Refusal::AmbiguousPath),
                b'%' => {
                    let decoded = segment
                        .get(i + 1..i + 3)
                        .and_then(|hex| Some(hex_digit(hex[0])? << 4 | hex_digit(hex[1])?))
                        .ok_or(Refusal::AmbiguousPath)?;
                    if decodes_ambiguously(decoded) {
                        return Err(Refusal::AmbiguousPath);
                    }
                    i += 3;
                }
                _ => i += 1,
            }
        }
    }
    Ok(())
}

/// A percent-encoded byte that must not be: an unreserved character, `/` or `\\` (the same
/// path to an application that decodes it), or a control character.
fn decodes_ambiguously(decoded: u8) -> bool {
    decoded.is_ascii_alphanumeric() || b"-._~/\\".contains(&decoded) || decoded.is_ascii_control()
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_paths_are_refused() {
        for path in [
            "/api/../admin",
            "/api/./x",
            "/..",
            "/a//b",
            "//admin",
            "/a\\b",
            "/%61dmin",
            "/a%2Fb",
            "/a%2fb",
            "/a%2e%2e/b",
            "/a%5Cb",
            "/a%zz",
            "/a%4",
            "/api/..;/admin",
            "/api/.;/admin",
            "/api/..;x=1/admin",
            "/api/%00x",
            "/api/x%0a",
            "/api/x%7F",
            "/api/x%1b",
            "/a%+5",
            "/a%/b",
            "/%",
            "/a/.",
            "/a/..",
            "/.;",
            "/a//",
            "/admin;/users",
            "/admin;x=1",
            "/a/..x;y",
            "/admin;jsessionid=1/users",
            "relative",
            "",
        ] {
            assert_eq!(check_path(path), Err(Refusal::AmbiguousPath), "{path}");
        }
        for path in [
            "/",
            "/api/orders/17",
            "/a/",
            "/a%20b",
            "/v1/chat/completions",
            "/..x/.y",
            "/a%3Bb",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    /// The single pass refuses exactly what the check did as separate passes over the path
    /// (kept here as the reference, with the same rule for a decoded byte), over generated
    /// paths made of the pieces that matter.
    #[test]
    fn one_pass_refuses_what_the_separate_passes_did() {
        fn reference(path: &str) -> Result<(), Refusal> {
            if !path.starts_with('/') || path.contains('\\') || path.contains(';') {
                return Err(Refusal::AmbiguousPath);
            }
            for segment in path[1..].split('/') {
                if segment == "." || segment == ".." {
                    return Err(Refusal::AmbiguousPath);
                }
            }
            if path.len() > 1 && path[1..].split('/').rev().skip(1).any(str::is_empty) {
                return Err(Refusal::AmbiguousPath);
            }
            let bytes = path.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let decoded = bytes
                        .get(i + 1..i + 3)
                        .and_then(|hex| std::str::from_utf8(hex).ok())
                        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                        .ok_or(Refusal::AmbiguousPath)?;
                    if decodes_ambiguously(decoded) {
                        return Err(Refusal::AmbiguousPath);
                    }
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Ok(())
        }
        // The harmless pieces first: most paths draw only from them.
        const PIECES: [&str; 22] = [
            "/a", "/b", "/", "a", "%20", "%3b", "%e9", "é", "~", ";x=1", ";", ".", "..", "%", "%2",
            "%2F", "%2e", "%41", "%+5", "%zz", "%7f", "\\",
        ];
        let mut rng = fastrand::Rng::with_seed(2026);
        let mut refused = 0;
        for _ in 0..50_000 {
            let harmful = if rng.bool() { PIECES.len() } else { 9 };
            let start = if rng.u8(..10) == 0 { "" } else { "/" };
            let path: String = std::iter::once(start)
                .chain((0..rng.usize(0..6)).map(|_| PIECES[rng.usize(..harmful)]))
                .collect();
            let expected = reference(&path);
            refused += usize::from(expected.is_err());
            assert_eq!(check_path(&path), expected, "{path:?}");
        }
        // Both outcomes are well represented.
        assert!((10_000..40_000).contains(&refused), "{refused}");
    }

    #[test]
    fn case_insensitive_routes_fold_the_route_id() {
        let rule = |matcher, case_insensitive| RouteRule {
            matcher,
            protocol: Protocol::Http,
            forward_user_token: false,
            body_limit: None,
            case_insensitive,
            credential: None,
        };
        let routes = [rule(PathMatch::Prefix("/Admin".to_owned()), true)];
        let classified =
            classify(&routes, "GET".into(), &"/ADMIN/users".into(), &"h".into()).unwrap();
        assert_eq!(classified.resource.id(), "/admin/users");
        let exact = [rule(PathMatch::Exact("/admin".to_owned()), true)];
        assert!(exact[0].matches("/ADMIN"));
        assert!(!exact[0].matches("/ADMIN/x"));
        let sensitive = [rule(PathMatch::Prefix("/admin".to_owned()), false)];
        assert!(!sensitive[0].matches("/ADMIN"));
        assert_eq!(
            classify(&sensitive, "GET".into(), &"/ADMIN".into(), &"h".into())
                .unwrap()
                .resource
                .id(),
            "/ADMIN"
        );
        // A multi-byte character where the prefix would end is no match, not a panic.
        assert!(!routes[0].matches("/Adé"));
    }

    #[test]
    fn an_exact_route_covers_its_path_with_one_slash_added() {
        let rule = |path: &str, case_insensitive| RouteRule {
            matcher: PathMatch::Exact(path.to_owned()),
            protocol: Protocol::Mcp,
            forward_user_token: false,
            body_limit: None,
            case_insensitive,
            credential: None,
        };
        let mcp = rule("/mcp", false);
        for (path, matched) in [
            ("/mcp", true),
            ("/mcp/", true),
            ("/mcp//", false),
            ("/mcp/x", false),
            ("/mcpx", false),
            ("/mc/", false),
            ("/MCP/", false),
        ] {
            assert_eq!(mcp.matches(path), matched, "{path}");
        }
        assert!(rule("/mcp", true).matches("/MCP/"));
        // A route written with its slash is that path only.
        assert!(!rule("/mcp/", false).matches("/mcp//"));
        assert!(!rule("/mcp/", false).matches("/mcp"));
    }

    #[test]
    fn unmatched_paths_are_generic_routes() {
        let classified = classify(
            &[],
            "GET".into(),
            &"/api/orders".into(),
            &"orders.internal".into(),
        )
        .unwrap();
        assert_eq!(classified.action, Action::Get);
        assert_eq!(classified.resource.id(), "/api/orders");
        assert_eq!(
            classify(&[], "TRACE".into(), &"/".into(), &"h".into()),
            Err(Refusal::UnsupportedMethod)
        );
    }
}

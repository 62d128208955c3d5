//! Header hygiene at the trust boundary.
//!
//! RFC 9110 §7.6.1: a proxy MUST remove the hop-by-hop fields, including every field named by
//! `Connection`, before forwarding. Identity fields are the proxy's to set: whatever the caller
//! sent under those names is removed first, so the application can trust what it receives.
//!
//! Names are compared with `_` read as `-`: Django, uvicorn, CGI/PHP-FPM and older Puma map
//! both to the same variable, so `x_portcullis_user` would otherwise reach the application as
//! `x-portcullis-user`. Method-override fields are removed (a method the policy never saw),
//! and forwarding fields are the proxy's own view, never the caller's.

use http::header::{self, HeaderMap, HeaderName};

pub const AGENT_HEADER: HeaderName = HeaderName::from_static("x-portcullis-agent");
pub const USER_HEADER: HeaderName = HeaderName::from_static("x-portcullis-user");
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");

/// Fields that are hop-by-hop whether or not `Connection` names them (RFC 9110 §7.6.1 and
/// the de-facto `Proxy-Connection` and `Keep-Alive`). `TE` is removed as a whole: the proxy
/// does not relay trailers-only negotiation to an HTTP/1.1 upstream.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Identity fields other proxies and gateways use; a caller must not be able to smuggle an
/// identity through any of them.
const FOREIGN_IDENTITY: [&str; 6] = [
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-ssl-client-cert",
    "ssl-client-cert",
    "x-client-verify",
    "x-ssl-client-verify",
];

/// Method-override fields honoured by common middleware (Express `method-override`, Rails,
/// Spring `HiddenHttpMethodFilter` variants): the policy decided the request's own method.
const METHOD_OVERRIDE: [&str; 3] = [
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
];

/// Forwarding fields (RFC 7239 and the de-facto `X-Forwarded-*`): removed from the caller's
/// request and replaced by [`set_forwarding`].
const FORWARDING: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// The field name as applications that map `-` and `_` to one character read it.
pub(crate) fn folded(name: &HeaderName) -> std::borrow::Cow<'_, str> {
    let name = name.as_str();
    if name.contains('_') {
        std::borrow::Cow::Owned(name.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Whether `name` folded (`_` read as `-`) is `target`, compared in place: most names differ
/// from most targets in length, so this is usually one comparison, where folding first
/// scanned every name for `_` on every check (a target holding `_` matches nothing, as the
/// folded name holds none).
pub(crate) fn folds_to(name: &str, target: &str) -> bool {
    name.len() == target.len() && folded_prefix(name.as_bytes(), target.as_bytes())
}

/// Whether `name` folded starts with `prefix`.
fn folded_prefix(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len()
        && name
            .iter()
            .zip(prefix)
            .all(|(&n, &p)| (if n == b'_' { b'-' } else { n }) == p)
}

/// Removes every field whose name satisfies `doomed` (which compares with [`folds_to`]).
pub(crate) fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&str) -> bool) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| doomed(name.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Removes hop-by-hop fields (including `Upgrade`, so no tunnel is ever negotiated) and every
/// field the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present, compared with the list, rather than a removal (a hash
    // and a probe) per listed name: most requests and responses carry at most `Connection`.
    // Only the fields `Connection` names that are present are made names of (an allocation
    // each): the usual `Connection: keep-alive` or `close` names none. `Connection` itself is
    // removed after the pass rather than collected: nearly every upstream response carries
    // it, and collecting it took an allocation per response.
    let mut connection = false;
    let mut transfer_encoded = false;
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        transfer_encoded |= *name == header::TRANSFER_ENCODING;
        if *name == header::CONNECTION {
            connection = true;
            doomed.extend(
                headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .filter_map(|value| value.to_str().ok())
                    .flat_map(|value| value.split(','))
                    .map(str::trim)
                    // `Host` is for every recipient (RFC 9110 §7.2): a sender may not list
                    // it (§7.6.1), and dropping it would forward the request to the
                    // upstream's own host rather than the one it was decided on.
                    .filter(|name| {
                        !name.is_empty()
                            && !name.eq_ignore_ascii_case("host")
                            && headers.contains_key(*name)
                    })
                    .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()),
            );
        } else if *name == header::UPGRADE || HOP_BY_HOP.contains(name) {
            doomed.push(name.clone());
        }
    }
    if connection {
        headers.remove(header::CONNECTION);
    }
    for name in doomed {
        headers.remove(name);
    }
    // A message framed by Transfer-Encoding was read by it: a Content-Length beside it is
    // not its length, and an intermediary must remove it (RFC 9112 §6.3), or the next hop
    // would cut the body at it (or wait for bytes that never come).
    if transfer_encoded {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Removes what the caller may not set (with `_` read as `-`), in one pass over the names:
/// identity fields (everything under `x-portcullis-`, and the client-certificate headers of
/// other proxies), method-override fields, the caller's forwarding fields, and `also` (the
/// user-token header, in every spelling).
pub fn remove_caller_supplied(headers: &mut HeaderMap, also: Option<&str>) {
    let listed = |list: &[&str], name: &str| list.iter().any(|target| folds_to(name, target));
    remove_where(headers, |name| {
        folded_prefix(name.as_bytes(), b"x-portcullis-")
            || listed(&FOREIGN_IDENTITY, name)
            || listed(&METHOD_OVERRIDE, name)
            || listed(&FORWARDING, name)
            || also.is_some_and(|also| folds_to(name, also))
    });
}

/// The value of `x-portcullis-user` for a user `sub`. A `sub` is any JSON string, and a
/// header value is not (no control characters, no non-ASCII in practice), so the value is the
/// `sub` percent-encoded as UTF-8 (RFC 3986 §2.1) wherever it holds a byte outside visible
/// ASCII, or `%` itself: the application percent-decodes the value and gets the `sub` back
/// exactly, and a `sub` that needed no encoding arrives as it was. Never absent: a delegated
/// call must not look autonomous to the application.
pub fn user_header_value(sub: &str) -> http::HeaderValue {
    let mut out = String::with_capacity(sub.len());
    for byte in sub.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    // Only visible ASCII remains, which is always a valid header value.
    http::HeaderValue::from_str(&out).unwrap_or_else(|_| http::HeaderValue::from_static("%3F"))
}

/// The proxy's own view of the connection: the peer's address, and TLS.
pub fn set_forwarding(headers: &mut HeaderMap, peer: &http::HeaderValue) {
    // Constants: `from_static` outside a const context checks the name at every call.
    const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    headers.insert(FOR, peer.clone());
    headers.insert(PROTO, http::HeaderValue::from_static("https"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Compared in place, a name folds to a target exactly when its folded text is it.
    #[test]
    fn folding_in_place_agrees_with_folding_first() {
        let names = [
            "x-api-key",
            "x_api_key",
            "x_api-key",
            "x-api-keys",
            "x-api-ke",
            "authorization",
            "x-portcullis-user",
            "x_portcullis_user",
            "x_portcullis_",
            "x-portcullis",
            "forwarded",
            "x-forwarded_for",
            "y-api-key",
        ];
        let targets = [
            "x-api-key",
            "x_api_key",
            "authorization",
            "x-forwarded-for",
            "",
        ];
        for name in names {
            let header = HeaderName::from_static(name);
            for target in targets {
                assert_eq!(
                    folds_to(name, target),
                    folded(&header) == target,
                    "{name} against {target}"
                );
            }
            assert_eq!(
                folded_prefix(name.as_bytes(), b"x-portcullis-"),
                folded(&header).starts_with("x-portcullis-"),
                "{name}"
            );
        }
    }

    #[test]
    fn connection_named_and_hop_by_hop_fields_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret , Upgrade"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("upgrade", HeaderValue::from_static("h2c"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("accept"));

        // The usual upstream response: `Connection` alone, naming no field present, and a
        // `Connection` naming itself.
        for value in ["keep-alive", "close", "connection"] {
            let mut headers = HeaderMap::new();
            headers.append("connection", HeaderValue::from_static(value));
            headers.append("connection", HeaderValue::from_static("keep-alive"));
            headers.insert("accept", HeaderValue::from_static("*/*"));
            remove_hop_by_hop(&mut headers);
            assert_eq!(headers.len(), 1, "{value}: {headers:?}");
        }

        // Every listed field and `Upgrade`, each twice, without `Connection`.
        let mut headers = HeaderMap::new();
        for name in HOP_BY_HOP[1..].iter().chain([&header::UPGRADE]) {
            headers.append(name, HeaderValue::from_static("1"));
            headers.append(name, HeaderValue::from_static("2"));
        }
        headers.insert("accept", HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
    }

    #[test]
    fn caller_identity_fields_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-portcullis-agent",
            HeaderValue::from_static("spiffe://evil/x"),
        );
        headers.insert("X-Portcullis-User", HeaderValue::from_static("admin"));
        headers.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("By=spiffe://x"),
        );
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        remove_caller_supplied(&mut headers, None);
        assert_eq!(headers.len(), 1, "{headers:?}");
    }

    #[test]
    fn underscore_spellings_of_identity_fields_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("x_portcullis_user", HeaderValue::from_static("admin"));
        headers.insert(
            "X_Portcullis-Agent",
            HeaderValue::from_static("spiffe://x/y"),
        );
        headers.insert("x_forwarded_client_cert", HeaderValue::from_static("By=x"));
        headers.insert("x_request_token", HeaderValue::from_static("kept"));
        remove_caller_supplied(&mut headers, None);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x_request_token"));
    }

    #[test]
    fn a_sub_that_is_no_header_value_is_percent_encoded() {
        assert_eq!(user_header_value("lee"), "lee");
        assert_eq!(user_header_value("josé"), "jos%C3%A9");
        assert_eq!(user_header_value("a%41 b\n"), "a%2541%20b%0A");
    }

    #[test]
    fn overrides_and_forwarding_are_replaced_by_the_proxys_view() {
        let mut headers = HeaderMap::new();
        for name in [
            "x-http-method-override",
            "x_http_method_override",
            "x-method-override",
            "x-http-method",
            "forwarded",
            "x-forwarded-for",
            "x_forwarded_for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "x_real_ip",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("DELETE"),
            );
        }
        headers.insert("accept", HeaderValue::from_static("*/*"));
        remove_caller_supplied(&mut headers, None);
        assert_eq!(headers.len(), 1, "{headers:?}");
        set_forwarding(&mut headers, &HeaderValue::from_static("10.0.0.7"));
        assert_eq!(headers["x-forwarded-for"], "10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }
}

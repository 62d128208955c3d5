//! Header hygiene at the trust boundary.
//!
//! RFC 9110 §7.6.1: a proxy MUST remove the hop-by-hop fields, including every field named by
//! `Connection`, before forwarding. Identity fields are the proxy's to set: whatever the caller
//! sent under those names is removed first, so the application can trust what it receives.

use http::header::{self, HeaderMap, HeaderName};

pub const AGENT_HEADER: &str = "x-portcullis-agent";
pub const USER_HEADER: &str = "x-portcullis-user";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Fields that are hop-by-hop whether or not `Connection` names them (RFC 9110 §7.6.1 and
/// the de-facto `Proxy-Connection` and `Keep-Alive`). `TE` is removed as a whole: the proxy
/// does not relay trailers-only negotiation to an HTTP/1.1 upstream.
const HOP_BY_HOP: [HeaderName; 8] = [
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

/// Removes hop-by-hop fields (including `Upgrade`, so no tunnel is ever negotiated) and every
/// field the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Removes caller-sent identity fields: everything under `x-portcullis-`, and the
/// client-certificate headers of other proxies.
pub fn remove_identity(headers: &mut HeaderMap) {
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-portcullis-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
    for name in FOREIGN_IDENTITY {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
        remove_identity(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
    }
}

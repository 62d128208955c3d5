//! `routes[].credential`: what the sidecar attaches to the upstream request after a permit, so
//! the agent never holds an upstream credential (DESIGN principle 2; "Approval and upstream
//! credentials").
//!
//! - `file`: a key in a file (a mounted Secret), re-read when its content changes; the
//!   caller's own value of that header is removed and ours set.
//! - `token_exchange`: RFC 8693. The verified user token is the `subject_token`; the sidecar
//!   authenticates to the token service with its SVID over mTLS (RFC 8705 §2); the requested
//!   scope is the route's, narrowed by the determining policies' `@scope` annotations. The
//!   issued token is cached per (user's issuer and subject, agent, audience, scope) until
//!   shortly before it expires, and goes to the upstream as `authorization: Bearer …`,
//!   never to the agent.
//!
//! Failure denies: a token service that cannot be reached, refuses, or answers something
//! unusable is 502 `credential_unavailable`, audited, and nothing is forwarded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use portcullis_identity::LiveIdentity;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::Shared;
use crate::audit::AuditGuard;
use crate::error::Refusal;
use crate::metrics::ExchangeResult;

/// One route's credential, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSpec {
    /// `{file, header, prefix}`.
    File {
        path: PathBuf,
        header: HeaderName,
        /// Put in front of the file's content (e.g. `Bearer `).
        prefix: String,
    },
    /// `{token_exchange: {endpoint, audience, scope, ca_file, timeout}}`.
    TokenExchange(TokenExchangeSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenExchangeSpec {
    /// The token service's `https` endpoint.
    pub endpoint: Uri,
    /// RFC 8693 §2.1 `audience`: the upstream the token is for.
    pub audience: String,
    /// The widest scope requested; `@scope` annotations narrow it.
    pub scope: Vec<String>,
    /// Roots the token service's certificate must chain to.
    pub ca_file: PathBuf,
    /// Connect, exchange and read, all together.
    pub timeout: Duration,
}

/// Why a credential could not be set up at start (a config error).
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is empty or not a valid header value")]
    Value(PathBuf),
    #[error("ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

/// A route's credential, ready to attach.
#[derive(Debug)]
pub(crate) enum Credential {
    File(FileCredential),
    Exchange(Box<Exchanger>),
}

impl Credential {
    pub(crate) fn new(
        spec: &CredentialSpec,
        identity: watch::Receiver<Arc<LiveIdentity>>,
    ) -> Result<Self, CredentialError> {
        match spec {
            CredentialSpec::File {
                path,
                header,
                prefix,
            } => FileCredential::load(path.clone(), header.clone(), prefix.clone()).map(Self::File),
            CredentialSpec::TokenExchange(spec) => {
                Exchanger::new(spec.clone(), identity).map(|e| Self::Exchange(Box::new(e)))
            }
        }
    }

    /// The audit record's `credential` value.
    fn kind(&self) -> &'static str {
        match self {
            Credential::File(_) => "file",
            Credential::Exchange(_) => "token_exchange",
        }
    }
}

/// What the credential step needs to know about the call.
#[derive(Debug)]
pub(crate) struct Subject<'a> {
    pub agent: &'a str,
    /// The verified user (`iss` and `sub`: the same `sub` at two issuers is two users) and
    /// the token as presented, for a delegated call.
    pub user: Option<(&'a portcullis_core::UserClaims, &'a str)>,
    pub scopes: &'a portcullis_policy::GrantedScopes,
}

/// Pipeline stage 5b, after the headers were rewritten and before forwarding: sets the
/// route's credential on `headers`. Refusals are audited by the caller; the detail is here.
pub(crate) async fn step(
    shared: &Shared,
    route: Option<usize>,
    subject: Subject<'_>,
    headers: &mut http::HeaderMap,
    audit: &mut AuditGuard,
) -> Result<(), Refusal> {
    let Some(credential) = route.and_then(|index| shared.credentials.get(index)?.as_ref()) else {
        return Ok(());
    };
    audit.record.credential = Some(credential.kind());
    match credential {
        Credential::File(file) => {
            let (header, value) = file.current();
            headers.remove(header);
            // The caller's own value under another spelling (`api_key` for `api-key`), which
            // applications reading `_` as `-` would take beside or instead of the sidecar's.
            if header.as_str().contains('-') {
                crate::headers::remove_where(headers, |name| {
                    crate::headers::folds_to(name, header.as_str())
                });
            }
            headers.insert(header.clone(), value);
            Ok(())
        }
        Credential::Exchange(exchanger) => {
            let Some((user, token)) = subject.user else {
                audit
                    .record
                    .errors
                    .push("token exchange needs the user's token; none was presented".to_owned());
                return Err(Refusal::InvalidUserToken("missing"));
            };
            // The route's scope narrowed by the determining permits' @scope; a route without
            // one asks for what @scope names rather than for the token service's default
            // (often its broadest), and for the default only when no permit names a scope.
            use portcullis_policy::GrantedScopes;
            let scope = match (&subject.scopes, exchanger.spec.scope.is_empty()) {
                (GrantedScopes::AtMost(allowed), true) => {
                    allowed.iter().map(String::as_str).collect()
                }
                (granted, _) => granted.narrow(&exchanger.spec.scope),
            };
            let narrowed_to_nothing = match &subject.scopes {
                GrantedScopes::AtMost(_) => scope.is_empty(),
                GrantedScopes::Unrestricted => false,
            };
            if narrowed_to_nothing || (scope.is_empty() && !exchanger.spec.scope.is_empty()) {
                audit.record.errors.push(
                    "no scope is allowed by both the route and the determining policies' @scope"
                        .to_owned(),
                );
                return Err(Refusal::PolicyDenied);
            }
            let count = |result| shared.metrics.count_token_exchange(result);
            match exchanger
                .credential((&user.issuer, &user.subject), subject.agent, token, &scope)
                .await
            {
                Ok((value, cached)) => {
                    count(if cached {
                        ExchangeResult::Cached
                    } else {
                        ExchangeResult::Ok
                    });
                    headers.remove(http::header::AUTHORIZATION);
                    headers.insert(http::header::AUTHORIZATION, value);
                    Ok(())
                }
                Err(detail) => {
                    count(ExchangeResult::Failed);
                    tracing::warn!(error = %detail, "token exchange failed");
                    audit
                        .record
                        .errors
                        .push(format!("token exchange: {detail}"));
                    Err(Refusal::CredentialUnavailable)
                }
            }
        }
    }
}

/// The user's token as presented, when `route` exchanges it (else nothing is copied).
pub(crate) fn subject_token(
    shared: &Shared,
    route: Option<usize>,
    headers: &http::HeaderMap,
) -> Option<String> {
    let exchanges = matches!(
        route.and_then(|index| shared.credentials.get(index)?.as_ref()),
        Some(Credential::Exchange(_))
    );
    let tokens = shared.user_token.as_ref().filter(|_| exchanges)?;
    presented_token(headers, &tokens.header).map(str::to_owned)
}

/// The caller's token as sent in `header` (without the `Bearer ` scheme).
fn presented_token<'h>(headers: &'h http::HeaderMap, header: &HeaderName) -> Option<&'h str> {
    let value = headers.get(header)?.to_str().ok()?;
    if *header == http::header::AUTHORIZATION {
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
    }
    Some(value.trim())
}

// ---- file -------------------------------------------------------------------------------

#[derive(Debug)]
pub(crate) struct FileCredential {
    path: PathBuf,
    header: HeaderName,
    prefix: String,
    current: ArcSwap<(HeaderValue, [u8; 32])>,
}

impl FileCredential {
    fn load(path: PathBuf, header: HeaderName, prefix: String) -> Result<Self, CredentialError> {
        let (value, hash) = read_value(&path, &prefix)?;
        Ok(Self {
            path,
            header,
            prefix,
            current: ArcSwap::from_pointee((value, hash)),
        })
    }

    fn current(&self) -> (&HeaderName, HeaderValue) {
        (&self.header, self.current.load().0.clone())
    }

    /// Re-reads the file; a changed, valid content replaces the value in use. A file that is
    /// missing or invalid keeps the last good value (a Secret mid-update), and says so.
    pub(crate) fn reload(&self) {
        match read_value(&self.path, &self.prefix) {
            Ok((value, hash)) if hash != self.current.load().1 => {
                self.current.store(Arc::new((value, hash)));
                tracing::info!(path = %self.path.display(), "upstream credential reloaded");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "upstream credential not reloaded; keeping the last good one");
            }
        }
    }
}

fn read_value(path: &PathBuf, prefix: &str) -> Result<(HeaderValue, [u8; 32]), CredentialError> {
    let bytes = std::fs::read(path).map_err(|source| CredentialError::Read {
        path: path.clone(),
        source,
    })?;
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    let text = String::from_utf8_lossy(&bytes);
    let key = text.trim();
    if key.is_empty() {
        return Err(CredentialError::Value(path.clone()));
    }
    let mut value = HeaderValue::from_str(&format!("{prefix}{key}"))
        .map_err(|_| CredentialError::Value(path.clone()))?;
    value.set_sensitive(true);
    Ok((value, hash))
}

/// Keeps every file credential current until shutdown.
pub(crate) async fn reload_files(
    shared: Arc<Shared>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    while crate::beat(interval, &mut shutdown).await {
        for credential in shared.credentials.iter().flatten() {
            if let Credential::File(file) = credential {
                file.reload();
            }
        }
    }
}

// ---- token exchange ---------------------------------------------------------------------

/// RFC 8693 §2.1.
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3: the user token is a JWT.
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Cached tokens at once; past it, tokens are still exchanged, just not remembered.
const MAX_CACHED: usize = 10_000;
/// Largest token service answer read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct Exchanger {
    spec: TokenExchangeSpec,
    tls: Arc<rustls::ClientConfig>,
    /// The sidecar's identity: its SVID is the client certificate, its id the `client_id`.
    identity: watch::Receiver<Arc<LiveIdentity>>,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    /// The exchange in flight per key: concurrent misses for one key (a burst of calls for
    /// the same user, or every call at once when a token nears expiry) wait for it and share
    /// its answer, failure included, instead of each asking the token service.
    pending: Mutex<HashMap<CacheKey, Arc<Pending>>>,
}

thread_local! {
    /// The key of the call being looked up, written into the same buffer each time: a
    /// cached credential (every call but the first of a user for a while) costs no
    /// allocation to find.
    static KEY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

type Exchanged = Result<(HeaderValue, Option<Duration>), String>;
type Pending = tokio::sync::OnceCell<Exchanged>;

/// Issuer, user, agent and scopes, each with its length before it, so that no two
/// different tuples share a key whatever bytes their parts hold (see [`write_key`]).
type CacheKey = Box<[u8]>;

/// Appends the cache key of one exchange: the user (`issuer`, `subject`), the agent it acts
/// through and the scopes it asks for, each part preceded by its length.
fn write_key(key: &mut Vec<u8>, (issuer, user): (&str, &str), agent: &str, scope: &[&str]) {
    for part in [issuer, user, agent]
        .into_iter()
        .chain(scope.iter().copied())
    {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
}

#[derive(Debug, Clone)]
struct Cached {
    value: HeaderValue,
    /// Shortly before the token expires: after this it is exchanged again.
    refresh_at: Instant,
}

/// Presents the SVID in force at each handshake (rotations are picked up).
#[derive(Debug)]
struct SvidClientCert(watch::Receiver<Arc<LiveIdentity>>);

impl rustls::client::ResolvesClientCert for SvidClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.borrow().client_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl Exchanger {
    fn new(
        spec: TokenExchangeSpec,
        identity: watch::Receiver<Arc<LiveIdentity>>,
    ) -> Result<Self, CredentialError> {
        let ca_error = |message: String| CredentialError::CaFile {
            path: spec.ca_file.clone(),
            message,
        };
        let certs = CertificateDer::pem_file_iter(&spec.ca_file)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ca_error(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(ca_error("no CA certificate in it".to_owned()));
        }
        let config =
            rustls::ClientConfig::builder_with_provider(portcullis_identity::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| ca_error(e.to_string()))?
                .with_root_certificates(roots)
                .with_client_cert_resolver(Arc::new(SvidClientCert(identity.clone())));
        Ok(Self {
            spec,
            identity,
            tls: Arc::new(config),
            cache: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The `authorization` value for this call, and whether it came from the cache (or from
    /// another call's exchange in flight) rather than from an exchange of its own.
    async fn credential(
        &self,
        user: (&str, &str),
        agent: &str,
        subject_token: &str,
        scope: &[&str],
    ) -> Result<(HeaderValue, bool), String> {
        let now = Instant::now();
        let cached = KEY.with_borrow_mut(|key| {
            key.clear();
            write_key(key, user, agent, scope);
            let cache = self.cache.lock().ok()?;
            let cached = cache.get(key.as_slice())?;
            (now < cached.refresh_at).then(|| cached.value.clone())
        });
        if let Some(value) = cached {
            return Ok((value, true));
        }
        let mut key = Vec::new();
        write_key(&mut key, user, agent, scope);
        let key = CacheKey::from(key);
        let scope = scope.join(" ");
        let pending = match self.pending.lock() {
            Ok(mut pending) => pending.entry(key.clone()).or_default().clone(),
            // A poisoned map only loses the sharing, not the exchange.
            Err(_) => Arc::default(),
        };
        // The first caller exchanges; if it goes away mid-exchange, a waiting one takes over.
        let exchanged = std::sync::atomic::AtomicBool::new(false);
        let answer = pending
            .get_or_init(|| async {
                exchanged.store(true, std::sync::atomic::Ordering::Relaxed);
                // Boxed: the HTTP exchange's future is large, and held inline it would make
                // every request's future larger, cached or not.
                let exchange = Box::pin(self.exchange(subject_token, &scope));
                tokio::time::timeout(self.spec.timeout, exchange)
                    .await
                    .map_err(|_| "token service did not answer in time".to_owned())
                    .and_then(|answer| answer)
            })
            .await
            .clone();
        let shared = !exchanged.load(std::sync::atomic::Ordering::Relaxed);
        let finished = || {
            // Cached (or failed) first, then no longer pending: no window in which a new
            // caller finds neither and exchanges again.
            if let Ok(mut map) = self.pending.lock()
                && map.get(&key).is_some_and(|p| Arc::ptr_eq(p, &pending))
            {
                map.remove(&key);
            }
        };
        let (value, lifetime) = match answer {
            Ok(answer) => answer,
            Err(error) => {
                finished();
                return Err(error);
            }
        };
        if let Some(lifetime) = lifetime
            && let Ok(mut cache) = self.cache.lock()
        {
            // Refresh a tenth of the lifetime early (at least 5s, at most a minute), so a
            // token never reaches the upstream in its last moments.
            let margin = (lifetime / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
            if let Some(usable) = lifetime.checked_sub(margin) {
                if cache.len() >= MAX_CACHED {
                    cache.retain(|_, cached| now < cached.refresh_at);
                }
                if cache.len() < MAX_CACHED {
                    cache.insert(
                        key.clone(),
                        Cached {
                            value: value.clone(),
                            refresh_at: now + usable,
                        },
                    );
                }
            }
        }
        finished();
        Ok((value, shared))
    }

    /// One RFC 8693 exchange over mTLS: the header value and the token's lifetime.
    async fn exchange(
        &self,
        subject_token: &str,
        scope: &str,
    ) -> Result<(HeaderValue, Option<Duration>), String> {
        let endpoint = &self.spec.endpoint;
        let client_id = self.identity.borrow().serving.id.to_string();
        let host = endpoint.host().ok_or("endpoint has no host")?;
        let port = endpoint.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|e| format!("server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("http: {e}"))?;
        tokio::spawn(connection);
        let mut form = vec![
            ("grant_type", GRANT_TYPE),
            ("subject_token", subject_token),
            ("subject_token_type", JWT_TOKEN_TYPE),
            ("audience", self.spec.audience.as_str()),
            // RFC 8705 §2: with mTLS client authentication the client still names itself;
            // the certificate, not this value, is what authenticates.
            ("client_id", client_id.as_str()),
        ];
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let request = Request::post(endpoint.clone())
            .header(
                http::header::HOST,
                endpoint.authority().map_or(host, |a| a.as_str()),
            )
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("exchange: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            // RFC 8693 §2.2.2: an OAuth error object; its code is safe to record.
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(format!("token service answered {status} {code}"));
        }
        parse_answer(&body)
    }
}

/// RFC 8693 §2.2.1: `access_token`, `issued_token_type`, `token_type`, `expires_in`.
fn parse_answer(body: &[u8]) -> Result<(HeaderValue, Option<Duration>), String> {
    let answer: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "answer is not JSON".to_owned())?;
    let token = answer
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("answer has no access_token")?;
    match answer.get("token_type").and_then(|v| v.as_str()) {
        Some(kind) if kind.eq_ignore_ascii_case("bearer") || kind.eq_ignore_ascii_case("n_a") => {}
        _ => return Err("answer's token_type is not Bearer".to_owned()),
    }
    let lifetime = answer
        .get("expires_in")
        .and_then(serde_json::Value::as_u64)
        .map(Duration::from_secs);
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "access_token is not a valid header value".to_owned())?;
    value.set_sensitive(true);
    Ok((value, lifetime))
}

/// `application/x-www-form-urlencoded` (WHATWG URL §5.2): unreserved bytes as they are,
/// space as `+`, everything else percent-encoded.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_tell_apart_every_split_of_the_same_bytes() {
        let key = |user, agent, scope: &[&str]| {
            let mut key = Vec::new();
            write_key(&mut key, user, agent, scope);
            key
        };
        let keys = [
            key(("ab", "c"), "d", &["e"]),
            key(("a", "bc"), "d", &["e"]),
            key(("a", "b"), "cd", &["e"]),
            key(("a", "b"), "c", &["de"]),
            key(("a", "b"), "c", &["d", "e"]),
            key(("a", "b"), "c", &["d e"]),
            key(("a", "b"), "c", &[]),
            key(("a", "b"), "c", &[""]),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(keys[0], key(("ab", "c"), "d", &["e"]));
    }

    #[test]
    fn form_encoding_escapes_what_it_must() {
        assert_eq!(form_encode("a b+c/d=é"), "a+b%2Bc%2Fd%3D%C3%A9");
        assert_eq!(form_encode("orders:read"), "orders%3Aread");
    }

    #[test]
    fn answers_without_a_usable_bearer_token_are_refused() {
        assert!(parse_answer(br#"{"token_type":"Bearer"}"#).is_err());
        assert!(parse_answer(br#"{"access_token":"t","token_type":"DPoP"}"#).is_err());
        assert!(parse_answer(b"not json").is_err());
        let (value, lifetime) =
            parse_answer(br#"{"access_token":"t","token_type":"Bearer","expires_in":60}"#).unwrap();
        assert_eq!(value, "Bearer t");
        assert_eq!(lifetime, Some(Duration::from_secs(60)));
    }
}

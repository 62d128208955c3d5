//! JWT test fixtures: signing keys minted in process (ES256, ES384, RS256, PS256, EdDSA),
//! their JWKS, tokens with arbitrary headers and claims (including ones no honest issuer
//! would produce), and a small real-TCP HTTP server that serves a JWKS and counts requests.
//!
//! Tokens are assembled here by hand and signed through `jsonwebtoken`, independently of
//! the verifier under test, so a shared bug cannot make both sides agree. Nothing here is
//! for production use.

// Fixtures: a failed mint or bind is a broken test environment, reported at its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A private signing key with its `kid` and JOSE algorithm.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh P-256 key for ES256.
    pub fn es256(kid: &str) -> Self {
        Self::ecdsa(kid, Algorithm::ES256)
    }

    /// A fresh P-384 key for ES384.
    pub fn es384(kid: &str) -> Self {
        Self::ecdsa(kid, Algorithm::ES384)
    }

    /// A fresh 2048-bit RSA key for RS256 (slow to mint: share it across a test).
    pub fn rs256(kid: &str) -> Self {
        Self::rsa(kid, Algorithm::RS256)
    }

    /// A fresh 2048-bit RSA key for PS256.
    pub fn ps256(kid: &str) -> Self {
        Self::rsa(kid, Algorithm::PS256)
    }

    /// A fresh Ed25519 key for EdDSA.
    pub fn eddsa(kid: &str) -> Self {
        // PKCS#8 v1: jsonwebtoken derives the public JWK from the 48-byte v1 form only.
        let pkcs8 = Ed25519KeyPair::generate_pkcs8v1(&SystemRandom::new()).expect("ed25519 keygen");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed25519 parse");
        SigningKey {
            alg: Algorithm::EdDSA,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            public_key: pair.public_key().as_ref().to_vec(),
        }
    }

    fn ecdsa(kid: &str, alg: Algorithm) -> Self {
        let signing = match alg {
            Algorithm::ES256 => &ECDSA_P256_SHA256_FIXED_SIGNING,
            _ => &ECDSA_P384_SHA384_FIXED_SIGNING,
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &SystemRandom::new()).expect("ec keygen");
        let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref()).expect("ec parse");
        SigningKey {
            alg,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            public_key: pair.public_key().as_ref().to_vec(),
        }
    }

    fn rsa(kid: &str, alg: Algorithm) -> Self {
        use aws_lc_rs::encoding::AsDer as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .expect("rsa keygen");
        let pkcs8 = pair.as_der().expect("rsa pkcs8");
        // jsonwebtoken signs RSA from PKCS#1; its PEM reader unwraps PKCS#8 for us.
        let pem = pem_block("PRIVATE KEY", pkcs8.as_ref());
        SigningKey {
            alg,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem"),
            public_key: pair.public_key().as_ref().to_vec(),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JOSE `alg` name.
    pub fn alg(&self) -> &'static str {
        match self.alg {
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::RS256 => "RS256",
            Algorithm::PS256 => "PS256",
            Algorithm::EdDSA => "EdDSA",
            _ => "unsupported",
        }
    }

    /// The raw public key: the SEC 1 uncompressed point (EC), the 32 bytes (Ed25519), or
    /// the PKCS#1 `RSAPublicKey` DER (RSA). What an attacker would use as an HMAC secret.
    pub fn public_key_bytes(&self) -> &[u8] {
        &self.public_key
    }

    /// The public JWK, with `kid`, `alg` and `use: sig`.
    pub fn jwk(&self) -> Value {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("public jwk");
        jwk.common.key_id = Some(self.kid.clone());
        let mut value = serde_json::to_value(&jwk).expect("jwk json");
        value["use"] = json!("sig");
        value
    }

    /// The public JWK without `kid` or `alg`, as some issuers publish them.
    pub fn bare_jwk(&self) -> Value {
        let mut value = self.jwk();
        if let Some(map) = value.as_object_mut() {
            map.remove("kid");
            map.remove("alg");
        }
        value
    }

    /// The standard header: `{"alg", "typ": "JWT", "kid"}`.
    pub fn header(&self) -> Value {
        json!({ "alg": self.alg(), "typ": "JWT", "kid": self.kid })
    }

    /// A token with the standard header and these claims.
    pub fn token(&self, claims: &Value) -> String {
        self.sign(&self.header(), claims)
    }

    /// A token with exactly this header (nothing added) and these claims, signed with this
    /// key's own algorithm whatever the header says.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        self.sign_text(&header.to_string(), &claims.to_string())
    }

    /// A token of exactly these header and claims texts, for what a `Value` cannot hold (a
    /// member named twice), signed with this key's own algorithm.
    pub fn sign_text(&self, header: &str, claims: &str) -> String {
        let input = format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(claims.as_bytes())
        );
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &self.encoding, self.alg).expect("sign");
        format!("{input}.{signature}")
    }
}

/// `{"keys": [...]}` of these keys' public JWKs.
pub fn jwks(keys: &[&SigningKey]) -> String {
    jwks_of(keys.iter().map(|k| k.jwk()).collect())
}

/// `{"keys": [...]}` of arbitrary JWK values.
pub fn jwks_of(jwks: Vec<Value>) -> String {
    json!({ "keys": jwks }).to_string()
}

/// `base64url(header).base64url(claims)`: the JWS signing input (RFC 7515 §5.1).
pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// An unsecured JWT (`alg: none`, RFC 7519 §6): empty signature segment.
pub fn unsigned_token(claims: &Value) -> String {
    format!(
        "{}.",
        signing_input(&json!({ "alg": "none", "typ": "JWT" }), claims)
    )
}

/// An HS256 token keyed with `secret`: the algorithm-confusion attack when `secret` is a
/// public key the verifier holds.
pub fn hs256_token(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let signature = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .expect("hmac sign");
    format!("{input}.{signature}")
}

/// A token with this header and claims and the given raw signature bytes.
pub fn token_with_signature(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!("{}.{}", signing_input(header, claims), b64url(signature))
}

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Claims a well-behaved issuer would mint: `iss`, `aud`, `sub`, `iat = now`,
/// `exp = now + 300`, scopes, email, groups, and `act.sub = actor`.
pub fn claims(issuer: &str, audience: &str, subject: &str, actor: &str, now: u64) -> Value {
    json!({
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": "orders:read orders:write",
        "email": format!("{subject}@example.org"),
        "groups": ["staff", "eu"],
        "act": { "sub": actor },
    })
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A JWKS endpoint on `127.0.0.1:0` over real TCP (HTTP/1.1, optionally TLS), serving whatever document it
/// currently holds and counting the requests it answered.
#[derive(Debug)]
pub struct JwksServer {
    addr: SocketAddr,
    scheme: &'static str,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    /// Plain HTTP (the verifier allows it for loopback hosts only).
    pub async fn start(jwks: String) -> Self {
        Self::serve(jwks, None).await
    }

    /// HTTPS with a certificate for `127.0.0.1` and `localhost` issued by a fresh CA;
    /// returns the server and that CA's PEM, for the verifier's `ca_file`.
    pub async fn start_tls(jwks: String) -> (Self, String) {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (Self::serve(jwks, Some(acceptor)).await, ca.pem())
    }

    async fn serve(jwks: String, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let body = Arc::new(Mutex::new(jwks));
        let hits = Arc::new(AtomicUsize::new(0));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (task_body, task_hits) = (Arc::clone(&body), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the server also closes keep-alive
            // connections a client pooled: a dropped server is really gone.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while connections.try_join_next().is_some() {}
                let (body, hits) = (Arc::clone(&task_body), Arc::clone(&task_hits));
                let tls = tls.clone();
                connections.spawn(async move {
                    let service = service_fn(move |_request: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let document = body.lock().expect("jwks body").clone();
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(document)))
                                    .expect("response"),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                        Some(tls) => {
                            // A client that refuses our certificate ends the handshake here.
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                    };
                });
            }
        });
        JwksServer {
            addr,
            scheme,
            body,
            hits,
            task,
        }
    }

    /// `http(s)://127.0.0.1:<port>/jwks.json`.
    pub fn url(&self) -> String {
        format!("{}://{}/jwks.json", self.scheme, self.addr)
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Replaces the document served from now on.
    pub fn set_jwks(&self, jwks: String) {
        *self.body.lock().expect("jwks body") = jwks;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! Fetching a JWKS over HTTPS: one bounded GET, with a deadline and a body cap.
//!
//! It does not decide when to fetch (the verifier rate-limits that) and follows no
//! redirects: the JWKS comes from the configured URL or not at all.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use super::error::JwksError;

pub(crate) struct UrlFetcher {
    uri: Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
}

impl fmt::Debug for UrlFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrlFetcher")
            .field("uri", &self.uri)
            .field("timeout", &self.timeout)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl UrlFetcher {
    pub(crate) fn new(
        url: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Self, JwksError> {
        let uri = check_url(url)?;

        // Roots: the operator's CA file when given (an in-cluster IdP), else the compiled-in
        // Mozilla set from webpki-roots. Chosen over rustls-native-certs because the sidecar
        // image is distroless with a read-only root filesystem and may have no system CA
        // bundle at all; webpki-roots is data only, with nothing to probe at run time.
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                    .map_err(|error| JwksError::CaFile {
                        path: path.to_owned(),
                        source: std::io::Error::other(error.to_string()),
                    })?;
                let (added, _ignored) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(JwksError::NoCaCertificates(path.to_owned()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(JwksError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        // The https connector below decides the scheme; `check_url` already limited plain
        // http to loopback hosts.
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(UrlFetcher {
            uri,
            client,
            timeout,
            max_bytes,
        })
    }

    pub(crate) fn url(&self) -> &Uri {
        &self.uri
    }

    /// One GET of the JWKS, bounded in time and size.
    pub(crate) async fn fetch(&self) -> Result<Bytes, JwksError> {
        let request = Request::get(self.uri.clone())
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .header(header::USER_AGENT, "portcullis")
            .body(Empty::new())
            .map_err(|e| JwksError::Fetch(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| JwksError::Fetch(error_chain(&e)))?;
            if response.status() != StatusCode::OK {
                return Err(JwksError::Status(response.status().as_u16()));
            }
            let body = Limited::new(response.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<LengthLimitError>().is_some() {
                        JwksError::TooLarge {
                            limit: self.max_bytes,
                        }
                    } else {
                        JwksError::Fetch(error_chain(e.as_ref()))
                    }
                })?;
            Ok(body.to_bytes())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| JwksError::Timeout)?
    }
}

/// `https` only, except `http` to a loopback host (tests, local development): a JWKS over
/// plain http anywhere else would let the network path choose which tokens are valid.
fn check_url(url: &str) -> Result<Uri, JwksError> {
    let invalid = |why| JwksError::InvalidUrl(url.to_owned(), why);
    let uri: Uri = url.parse().map_err(|_| invalid("not a valid url"))?;
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("user info is not allowed"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(authority.host()) => Ok(uri),
        Some("http") => Err(invalid("plain http is only allowed for loopback hosts")),
        _ => Err(invalid("scheme must be https")),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// hyper's errors say little at the top level ("client error (Connect)"); the cause is in
/// the source chain.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://idp.example.org/jwks.json").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://[::1]:8080/jwks").is_ok());
        assert!(check_url("http://localhost/jwks").is_ok());
        assert!(check_url("http://idp.example.org/jwks.json").is_err());
        assert!(check_url("http://10.0.0.1/jwks.json").is_err());
        assert!(check_url("ftp://idp.example.org/jwks.json").is_err());
        assert!(check_url("https://user:pw@idp.example.org/jwks.json").is_err());
        assert!(check_url("/jwks.json").is_err());
    }
}

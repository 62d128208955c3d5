//! Certificate authorities and SVIDs minted with rcgen.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// Errors from minting are programming errors in a test or the demo, reported as strings.
pub type MintError = rcgen::Error;

/// A SPIFFE trust domain's root CA.
pub struct Ca {
    pub trust_domain: String,
    params: CertificateParams,
    key: KeyPair,
    cert: Certificate,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What a minted leaf looks like. The defaults are a well-formed X509-SVID for clients and
/// servers; tests flip one field at a time to produce each malformed case.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_loopback: bool,
    pub client_auth: bool,
    pub server_auth: bool,
    pub is_ca: bool,
    pub key_cert_sign: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    pub fn workload(spiffe_id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: vec![spiffe_id.to_owned()],
            dns_names: Vec::new(),
            ip_loopback: false,
            client_auth: true,
            server_auth: true,
            is_ca: false,
            key_cert_sign: false,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::hours(1),
        }
    }

    /// A serving certificate for a proxy on loopback: the workload ID plus `localhost` and
    /// `127.0.0.1`, so ordinary HTTPS clients (curl) can verify it too.
    pub fn server(spiffe_id: &str) -> Self {
        Self {
            dns_names: vec!["localhost".to_owned()],
            ip_loopback: true,
            ..Self::workload(spiffe_id)
        }
    }
}

/// A leaf certificate, its issuer's chain and its key.
#[derive(Clone)]
pub struct Svid {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid").finish_non_exhaustive()
    }
}

impl Svid {
    /// An SVID read back from PEM (e.g. files `portcullis dev-certs` wrote); `None` unless
    /// both parse and the key is PKCS#8.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Option<Self> {
        use rustls::pki_types::pem::PemObject as _;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
        let PrivateKeyDer::Pkcs8(key) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).ok()?
        else {
            return None;
        };
        Some(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            key_der: key.secret_pkcs8_der().to_vec(),
        })
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl Ca {
    /// A root valid from an hour ago for a day.
    pub fn new(trust_domain: &str) -> Result<Self, MintError> {
        let now = OffsetDateTime::now_utc();
        Self::with_validity(
            trust_domain,
            now - Duration::hours(1),
            now + Duration::days(1),
        )
    }

    pub fn with_validity(
        trust_domain: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, MintError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Portcullis test");
        name.push(DnType::CommonName, format!("{trust_domain} root"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            params,
            key,
            cert,
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A well-formed SVID for `spiffe_id`.
    pub fn svid(&self, spiffe_id: &str) -> Result<Svid, MintError> {
        self.leaf(&LeafSpec::workload(spiffe_id))
    }

    pub fn leaf(&self, spec: &LeafSpec) -> Result<Svid, MintError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Portcullis test");
        params.distinguished_name = name;
        let mut sans = Vec::new();
        for uri in &spec.uris {
            sans.push(SanType::URI(uri.clone().try_into()?));
        }
        for dns in &spec.dns_names {
            sans.push(SanType::DnsName(dns.clone().try_into()?));
        }
        if spec.ip_loopback {
            sans.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        }
        params.subject_alt_names = sans;
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.key_cert_sign {
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Svid {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }
}

/// An mTLS client config for a caller presenting `svid` (or nothing) and trusting `roots`
/// for the server, offering `alpn`.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    svid: Option<&Svid>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store);
    let mut config = match svid {
        Some(svid) => builder.with_client_auth_cert(vec![svid.cert_der.clone()], svid.key_der())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

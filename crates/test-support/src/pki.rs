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

/// A SPIFFE trust domain's root CA, or an intermediate CA under one.
pub struct Ca {
    pub trust_domain: String,
    params: CertificateParams,
    key: KeyPair,
    cert: Certificate,
    /// What a leaf this CA signs presents after itself: empty for a root (roots come from the
    /// bundle), this CA and its issuers' intermediates otherwise.
    chain: Vec<CertificateDer<'static>>,
    /// `chain` in PEM, for certificate files.
    chain_pem: String,
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
    pub digital_signature: bool,
    pub key_agreement: bool,
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
            digital_signature: true,
            key_agreement: false,
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
    /// The leaf followed by the intermediates it is presented with.
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// Intermediates presented after the leaf (empty when a root signed it).
    pub chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid").finish_non_exhaustive()
    }
}

impl Svid {
    /// The leaf and its intermediates, as a TLS peer presents them.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert_der.clone())
            .chain(self.chain.iter().cloned())
            .collect()
    }

    /// An SVID read back from PEM (e.g. files `portcullis dev-certs` wrote); `None` unless
    /// both parse and the key is PKCS#8.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Option<Self> {
        use rustls::pki_types::pem::PemObject as _;
        let mut certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes());
        let cert_der = certs.next()?.ok()?;
        let chain = certs.collect::<Result<Vec<_>, _>>().ok()?;
        let PrivateKeyDer::Pkcs8(key) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).ok()?
        else {
            return None;
        };
        Some(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            chain,
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
        Self::root(trust_domain, true, not_before, not_after)
    }

    /// A root whose key usage lacks keyCertSign (X509-SVID §4.3 says it must not sign).
    pub fn without_key_cert_sign(trust_domain: &str) -> Result<Self, MintError> {
        let now = OffsetDateTime::now_utc();
        Self::root(
            trust_domain,
            false,
            now - Duration::hours(1),
            now + Duration::days(1),
        )
    }

    fn root(
        trust_domain: &str,
        key_cert_sign: bool,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, MintError> {
        let params = ca_params(
            trust_domain,
            &format!("{trust_domain} root"),
            key_cert_sign,
            not_before,
            not_after,
        )?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            params,
            key,
            cert,
            chain: Vec::new(),
            chain_pem: String::new(),
        })
    }

    /// An intermediate CA signed by this one; `key_cert_sign: false` mints the malformed one
    /// whose key usage does not allow it to sign certificates.
    pub fn intermediate(&self, name: &str, key_cert_sign: bool) -> Result<Self, MintError> {
        let now = OffsetDateTime::now_utc();
        let params = ca_params(
            &self.trust_domain,
            name,
            key_cert_sign,
            now - Duration::hours(1),
            now + Duration::days(1),
        )?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &Issuer::from_params(&self.params, &self.key))?;
        let chain = std::iter::once(cert.der().clone())
            .chain(self.chain.iter().cloned())
            .collect();
        let chain_pem = cert.pem() + &self.chain_pem;
        Ok(Self {
            trust_domain: self.trust_domain.clone(),
            params,
            key,
            cert,
            chain,
            chain_pem,
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
        params.key_usages = Vec::new();
        if spec.digital_signature {
            params.key_usages.push(KeyUsagePurpose::DigitalSignature);
        }
        if spec.key_agreement {
            params.key_usages.push(KeyUsagePurpose::KeyAgreement);
        }
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
            cert_pem: cert.pem() + &self.chain_pem,
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            chain: self.chain.clone(),
            key_der: key.serialize_der(),
        })
    }
}

fn ca_params(
    trust_domain: &str,
    common_name: &str,
    key_cert_sign: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, MintError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Portcullis test");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = if key_cert_sign {
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
    } else {
        vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature]
    };
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
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
        Some(svid) => builder.with_client_auth_cert(svid.cert_chain(), svid.key_der())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

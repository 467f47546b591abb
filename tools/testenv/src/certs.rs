//! Test PKI: a CA per server, serving certificates for loopback, client certificates.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.distinguished_name.push(DnType::CommonName, common_name);
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    /// The CA certificate, to trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for `localhost` and `127.0.0.1`.
    pub fn loopback_server(&self, common_name: &str) -> anyhow::Result<CertKey> {
        self.server(common_name, &[])
    }

    /// A serving certificate for `localhost`, `127.0.0.1` and each of `names` (host names or IPs).
    pub fn server(&self, common_name: &str, names: &[&str]) -> anyhow::Result<CertKey> {
        let mut all = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        all.extend(names.iter().map(|n| n.to_string()));
        let mut params = CertificateParams::new(all)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate; Kubernetes reads the user from CN and the groups from O.
    pub fn client(&self, common_name: &str, organizations: &[&str]) -> anyhow::Result<CertKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        for org in organizations {
            params.distinguished_name.push(DnType::OrganizationName, *org);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> anyhow::Result<CertKey> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A key pair for signing (e.g. ServiceAccount tokens): private and public PEM.
pub fn signing_key() -> anyhow::Result<CertKey> {
    let key = KeyPair::generate()?;
    Ok(CertKey { cert_pem: key.public_key_pem(), key_pem: key.serialize_pem() })
}

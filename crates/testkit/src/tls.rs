//! Certificates for tests: a CA of the test's own and server certificates it signs, written
//! as PEM files the services read (`GATEWAY_TLS_CERT_FILE`, `AGENT_CA_FILE`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Write the CA's certificate to `dir/<file>`: its path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.pem()).expect("writing the CA certificate");
        path
    }

    /// A server certificate for 127.0.0.1 and localhost, `cn` its common name: (certificate
    /// PEM, key PEM).
    pub fn server(&self, cn: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Write a server certificate and key to `dir/server.crt` and `dir/server.key` (replacing
    /// what is there, each file in one rename): their paths.
    pub fn write_server(&self, dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.server(cn);
        let put = |name: &str, text: &str| {
            let path = dir.join(name);
            let part = dir.join(format!("{name}.part"));
            std::fs::write(&part, text).expect("writing a certificate file");
            std::fs::rename(&part, &path).expect("renaming a certificate file");
            path
        };
        // The key first: a reload between the two renames sees a pair that does not match
        // and keeps the previous one until the certificate follows.
        let key = put("server.key", &key);
        (put("server.crt", &cert), key)
    }
}

//! Credentials for tests of TLS and authentication: certificate authorities and
//! certificates made at test time (rcgen), bearer tokens and the auth file that knows
//! them, and clients that send them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kpi_service::proto::audit_client::AuditClient;
use kpi_service::proto::ingest_client::IngestClient;
use kpi_service::proto::kpi_catalog_client::KpiCatalogClient;
use kpi_service::proto::query_client::QueryClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct CertifiedKey {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn sign(&self, params: CertificateParams) -> CertifiedKey {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        CertifiedKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> CertifiedKey {
        let params =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("params");
        self.sign(params)
    }

    /// A client certificate whose subject's common name is `name`.
    pub fn client(&self, name: &str) -> CertifiedKey {
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        self.sign(params)
    }
}

/// Writes `contents` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write test file");
    path
}

/// A channel to `addr` over TLS, trusting `ca_pem`, with a client certificate when given.
/// Connects lazily: a handshake failure shows as the first call's error.
pub fn tls_channel(addr: SocketAddr, ca_pem: &str, client: Option<&CertifiedKey>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert, &client.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Adds `authorization: Bearer <token>` to every request, when it has a token.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(
            token.map(|token| {
                MetadataValue::try_from(format!("Bearer {token}")).expect("ascii token")
            }),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The clients of one channel, sending one token (or none).
pub struct Clients {
    channel: Channel,
    bearer: Bearer,
}

pub type Authed = InterceptedService<Channel, Bearer>;

impl Clients {
    pub fn new(channel: Channel, token: Option<&str>) -> Self {
        Self {
            channel,
            bearer: Bearer::new(token),
        }
    }

    pub fn catalog(&self) -> KpiCatalogClient<Authed> {
        KpiCatalogClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn ingest(&self) -> IngestClient<Authed> {
        IngestClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn query(&self) -> QueryClient<Authed> {
        QueryClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn audit(&self) -> AuditClient<Authed> {
        AuditClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

/// One principal of a test auth file.
pub struct TestPrincipal<'a> {
    pub name: &'a str,
    pub roles: &'a [&'a str],
    pub token: Option<&'a str>,
    pub certificate_subject: Option<&'a str>,
}

/// The auth file text of `principals`, tokens stored as their SHA-256 as an operator's
/// file holds them.
pub fn auth_file(principals: &[TestPrincipal<'_>]) -> String {
    use sha2::{Digest, Sha256};
    let mut text = String::new();
    for principal in principals {
        let roles: Vec<String> = principal.roles.iter().map(|r| format!("\"{r}\"")).collect();
        text.push_str(&format!(
            "[[principal]]\nname = \"{}\"\nroles = [{}]\n",
            principal.name,
            roles.join(", ")
        ));
        if let Some(token) = principal.token {
            let hash: String = Sha256::digest(token.as_bytes())
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            text.push_str(&format!("token_sha256 = \"{hash}\"\n"));
        }
        if let Some(subject) = principal.certificate_subject {
            text.push_str(&format!("certificate_subject = \"{subject}\"\n"));
        }
        text.push('\n');
    }
    text
}

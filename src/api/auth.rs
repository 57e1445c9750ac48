//! Who may call what: the principals of the auth file (a bearer token, stored as its
//! SHA-256, or a client certificate's subject under mutual TLS), their roles, the role
//! each RPC needs, and the gate (a tower layer) that checks every request before any
//! service sees it.
//!
//! The gate answers UNAUTHENTICATED when a request names no principal the server knows,
//! and PERMISSION_DENIED when the principal lacks the method's role; a refused request
//! reaches no handler, so it reads and stores nothing. The principal it lets through goes
//! into the request's extensions, and from there into the events the request appends
//! ([`acting`]). grpc.health.v1 is open to everyone, for probes.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::service::KpiService;

/// A role: a set of RPCs (README, "Security").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Queries, WatchKpis, catalog reads.
    Reader,
    /// Record, RecordStream, Retract.
    Writer,
    /// Catalog and target changes.
    Admin,
    /// ReplayEvents, VerifyLog, GetLogInfo, ListStreams.
    Auditor,
}

impl Role {
    /// Every role, in the order of the README's table.
    pub const ALL: [Role; 4] = [Role::Reader, Role::Writer, Role::Admin, Role::Auditor];

    /// The role's name in the auth file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }

    /// The role named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every RPC of kpi.v1 with the role it needs (the README's table says the same).
pub const RPC_ROLES: [(&str, Role); 19] = [
    ("/kpi.v1.KpiCatalog/DefineKpi", Role::Admin),
    ("/kpi.v1.KpiCatalog/UpdateKpi", Role::Admin),
    ("/kpi.v1.KpiCatalog/GetKpi", Role::Reader),
    ("/kpi.v1.KpiCatalog/ListKpis", Role::Reader),
    ("/kpi.v1.KpiCatalog/RetireKpi", Role::Admin),
    ("/kpi.v1.KpiCatalog/SetTarget", Role::Admin),
    ("/kpi.v1.KpiCatalog/RemoveTarget", Role::Admin),
    ("/kpi.v1.KpiCatalog/ListTargets", Role::Reader),
    ("/kpi.v1.Ingest/Record", Role::Writer),
    ("/kpi.v1.Ingest/RecordStream", Role::Writer),
    ("/kpi.v1.Ingest/Retract", Role::Writer),
    ("/kpi.v1.Query/GetAggregates", Role::Reader),
    ("/kpi.v1.Query/GetTrend", Role::Reader),
    ("/kpi.v1.Query/GetTargetStatus", Role::Reader),
    ("/kpi.v1.Query/WatchKpis", Role::Reader),
    ("/kpi.v1.Audit/ReplayEvents", Role::Auditor),
    ("/kpi.v1.Audit/VerifyLog", Role::Auditor),
    ("/kpi.v1.Audit/GetLogInfo", Role::Auditor),
    ("/kpi.v1.Audit/ListStreams", Role::Auditor),
];

/// What a request path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Nothing: grpc.health.v1, for probes.
    Open,
    /// A known principal with this role.
    Role(Role),
    /// A known principal, whatever its roles: server reflection (the contract is public,
    /// but nobody unknown learns anything from the server) and paths no service serves.
    Known,
}

fn access(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Access::Open;
    }
    RPC_ROLES
        .iter()
        .find(|(rpc, _)| *rpc == path)
        .map_or(Access::Known, |&(_, role)| Access::Role(role))
}

/// Someone the server knows: a name for the audit trail and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The name events store as their actor.
    pub name: Arc<str>,
    roles: u8,
}

impl Principal {
    fn new(name: &str, roles: &[Role]) -> Self {
        Self {
            name: name.into(),
            roles: roles.iter().fold(0, |bits, role| bits | role.bit()),
        }
    }

    /// Whether the principal has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles & role.bit() != 0
    }

    fn role_names(&self) -> String {
        let names: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|role| self.has(*role))
            .map(Role::name)
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

/// The service acting for the principal the gate let through with `request`: the events
/// its commands append name that principal as their actor. `service` itself when the
/// request has none (a server without authentication): nothing is cloned.
pub fn acting<'a, T>(service: &'a KpiService, request: &tonic::Request<T>) -> Cow<'a, KpiService> {
    match request.extensions().get::<Principal>() {
        Some(principal) => Cow::Owned(service.acting_as(Some(principal.name.clone()))),
        None => Cow::Borrowed(service),
    }
}

/// Why the auth file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// It cannot be read.
    #[error("auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid auth file.
    #[error("auth file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
}

/// One `[[principal]]` entry of the auth file, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    name: String,
    roles: Vec<String>,
    token_sha256: Option<String>,
    certificate_subject: Option<String>,
}

/// The auth file, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFileText {
    #[serde(default)]
    principal: Vec<PrincipalEntry>,
}

/// Longest principal name, in bytes: it is stored with every event the principal causes.
pub const MAX_PRINCIPAL_NAME_LEN: usize = 128;

/// The principals of an auth file, by token hash and by certificate subject.
#[derive(Debug, Default)]
pub struct Principals {
    by_token: HashMap<[u8; 32], Principal>,
    by_subject: HashMap<String, Principal>,
}

impl Principals {
    /// Reads and checks the auth file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| AuthFileError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses and checks an auth file's text (TOML; see the README's "Security").
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: AuthFileText = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut principals = Self::default();
        let mut names = HashSet::new();
        for (index, entry) in file.principal.into_iter().enumerate() {
            let at = |reason: String| format!("principal[{index}]: {reason}");
            if entry.name.is_empty() || entry.name.len() > MAX_PRINCIPAL_NAME_LEN {
                return Err(at(format!(
                    "name must be 1 to {MAX_PRINCIPAL_NAME_LEN} bytes"
                )));
            }
            let mut roles = Vec::new();
            for role in &entry.roles {
                roles.push(Role::from_name(role).ok_or_else(|| {
                    at(format!(
                        "unknown role '{role}' (roles: reader, writer, admin, auditor)"
                    ))
                })?);
            }
            if roles.is_empty() {
                return Err(at("roles must name at least one role".into()));
            }
            if entry.token_sha256.is_none() && entry.certificate_subject.is_none() {
                return Err(at(
                    "needs token_sha256 (a bearer token's SHA-256, hex) or certificate_subject"
                        .into(),
                ));
            }
            names.insert(entry.name.clone());
            let principal = Principal::new(&entry.name, &roles);
            if let Some(hex) = &entry.token_sha256 {
                let hash = parse_sha256(hex).ok_or_else(|| {
                    at("token_sha256 must be 64 hexadecimal digits (a SHA-256)".into())
                })?;
                if principals
                    .by_token
                    .insert(hash, principal.clone())
                    .is_some()
                {
                    return Err(at("the same token_sha256 as an earlier principal".into()));
                }
            }
            if let Some(subject) = entry.certificate_subject {
                if subject.is_empty() {
                    return Err(at("certificate_subject is empty".into()));
                }
                if principals
                    .by_subject
                    .insert(subject.clone(), principal)
                    .is_some()
                {
                    return Err(at(format!(
                        "certificate_subject '{subject}' is an earlier principal's too"
                    )));
                }
            }
        }
        Ok(principals)
    }

    /// How many principal entries there are (a name with two tokens counts twice).
    pub fn len(&self) -> usize {
        self.by_token.len() + self.by_subject.len()
    }

    /// Whether there is none: every request but health checks is then refused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_sha256(digits: &str) -> Option<[u8; 32]> {
    let mut hash = [0; 32];
    hex::decode_to_slice(digits, &mut hash).ok()?;
    Some(hash)
}

/// The SHA-256 of a bearer token, as the auth file's `token_sha256` holds it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random bearer token (256 bits, `kpi_` and URL-safe base64) and the auth file
/// entry that gives `name` the `roles` with it; the token itself is stored nowhere.
pub fn new_token(name: &str, roles: &[Role]) -> Result<(String, String), String> {
    if name.is_empty() || name.len() > MAX_PRINCIPAL_NAME_LEN {
        return Err(format!(
            "the name must be 1 to {MAX_PRINCIPAL_NAME_LEN} bytes"
        ));
    }
    if roles.is_empty() {
        return Err("give at least one --role".into());
    }
    let mut secret = [0_u8; 32];
    getrandom::fill(&mut secret).map_err(|error| format!("no random bytes: {error}"))?;
    use base64::Engine as _;
    let token = format!(
        "kpi_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let roles: Vec<String> = roles
        .iter()
        .map(|role| format!("\"{}\"", role.name()))
        .collect();
    let entry = format!(
        "[[principal]]\nname = {}\nroles = [{}]\ntoken_sha256 = \"{}\"\n",
        toml_string(name),
        roles.join(", "),
        token_sha256(&token)
    );
    Ok((token, entry))
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    let mut quoted = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Why the gate refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// No principal the server knows.
    Unauthenticated(String),
    /// A known principal without the method's role.
    PermissionDenied(String),
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Unauthenticated(reason) => super::status::unauthenticated(reason),
            Refusal::PermissionDenied(reason) => super::status::permission_denied(reason),
        }
    }
}

/// What the gate knows of one request.
struct Credentials<'a> {
    /// The `authorization` header, when there is one.
    authorization: Option<&'a [u8]>,
    /// The subject of the client's certificate, verified by mutual TLS.
    certificate_subject: Option<String>,
}

/// The principal of a request for `path`, or why it is refused. `principals` is `None`
/// when the server runs without an auth file: everyone may do everything, and a client
/// certificate's subject (mutual TLS) still names the actor.
fn decide(
    principals: Option<&Principals>,
    path: &str,
    credentials: Credentials<'_>,
) -> Result<Option<Principal>, Refusal> {
    let access = access(path);
    let Some(principals) = principals else {
        return Ok(credentials
            .certificate_subject
            .map(|subject| Principal::new(&subject, &Role::ALL)));
    };
    if access == Access::Open {
        return Ok(None);
    }
    let principal = match (credentials.authorization, credentials.certificate_subject) {
        (Some(header), _) => {
            let token = bearer_token(header).ok_or_else(|| {
                Refusal::Unauthenticated("the authorization header must be 'Bearer <token>'".into())
            })?;
            let hash: [u8; 32] = Sha256::digest(token).into();
            principals.by_token.get(&hash).ok_or_else(|| {
                Refusal::Unauthenticated("the bearer token is not in the server's auth file".into())
            })?
        }
        (None, Some(subject)) => principals.by_subject.get(&subject).ok_or_else(|| {
            Refusal::Unauthenticated(format!(
                "client certificate subject '{subject}' is not in the server's auth file"
            ))
        })?,
        (None, None) => {
            return Err(Refusal::Unauthenticated(
                "this server needs credentials: an 'authorization: Bearer <token>' header or a client certificate".into(),
            ));
        }
    };
    match access {
        Access::Role(role) if !principal.has(role) => Err(Refusal::PermissionDenied(format!(
            "{} needs the role '{role}'; principal '{}' has: {}",
            path.trim_start_matches('/'),
            principal.name,
            principal.role_names()
        ))),
        _ => Ok(Some(principal.clone())),
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// The subject of a verified client certificate: its common name (CN), or the whole
/// distinguished name (RFC 4514) when it has none. `None` without one, or when it does
/// not parse (rustls verified it, so that does not happen).
fn certificate_subject<B>(request: &http::Request<B>) -> Option<String> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let subject = certificate.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|name| name.as_str().ok());
    Some(common_name.map_or_else(|| subject.to_string(), str::to_owned))
}

/// The gate's state: the principals (replaced on reload) and which RPCs are switched off.
pub struct Gate {
    /// `None` without an auth file.
    principals: Option<RwLock<Arc<Principals>>>,
    /// The auth file, for reloads.
    path: Option<PathBuf>,
    /// Whether ListStreams is served (`--no-list-streams` switches it off).
    list_streams: bool,
}

impl Gate {
    /// The gate of a server with the auth file at `path` (none: everyone may do
    /// everything), serving ListStreams or not.
    pub fn new(path: Option<&Path>, list_streams: bool) -> Result<Self, AuthFileError> {
        let principals = path
            .map(|path| Principals::load(path).map(|loaded| RwLock::new(Arc::new(loaded))))
            .transpose()?;
        Ok(Self {
            principals,
            path: path.map(Path::to_owned),
            list_streams,
        })
    }

    /// The auth file, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the auth file again; on an error the principals stay as they were.
    pub fn reload(&self) -> Result<usize, AuthFileError> {
        let (Some(path), Some(principals)) = (&self.path, &self.principals) else {
            return Ok(0);
        };
        let loaded = Principals::load(path)?;
        let count = loaded.len();
        *principals
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
        Ok(count)
    }

    fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Principal>, Status> {
        let path = request.uri().path();
        let principals = self.principals.as_ref().map(|principals| {
            principals
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        });
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes);
        // The certificate is parsed only when it can decide something.
        let certificate_subject = if authorization.is_none() || principals.is_none() {
            certificate_subject(request)
        } else {
            None
        };
        let principal = decide(
            principals.as_deref(),
            path,
            Credentials {
                authorization,
                certificate_subject,
            },
        )?;
        if !self.list_streams && path == "/kpi.v1.Audit/ListStreams" {
            return Err(Status::unimplemented(
                "ListStreams is switched off on this server (--no-list-streams)",
            ));
        }
        Ok(principal)
    }
}

/// The tower layer of the gate, around every route of the server.
#[derive(Clone)]
pub struct GateLayer {
    gate: Arc<Gate>,
}

impl GateLayer {
    /// A layer checking requests with `gate`.
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// A service behind the gate.
#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.check(&request) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                let response = status.into_http();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READER_TOKEN: &str = "kpi_reader";
    const ADMIN_TOKEN: &str = "kpi_admin";

    fn principals() -> Principals {
        Principals::parse(&format!(
            r#"
            [[principal]]
            name = "dashboard"
            roles = ["reader"]
            token_sha256 = "{}"

            [[principal]]
            name = "ops"
            roles = ["admin", "auditor"]
            token_sha256 = "{}"
            certificate_subject = "ops.example"
            "#,
            token_sha256(READER_TOKEN),
            token_sha256(ADMIN_TOKEN)
        ))
        .unwrap()
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    fn with_token<'a>(header: &'a [u8]) -> Credentials<'a> {
        Credentials {
            authorization: Some(header),
            certificate_subject: None,
        }
    }

    #[test]
    fn every_rpc_of_the_contract_has_a_role() {
        let descriptors = <prost_types::FileDescriptorSet as prost::Message>::decode(
            crate::proto::FILE_DESCRIPTOR_SET,
        )
        .unwrap();
        let mut paths: Vec<String> = Vec::new();
        for file in descriptors.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        paths.sort();
        let mut table: Vec<String> = RPC_ROLES.iter().map(|(path, _)| (*path).into()).collect();
        table.sort();
        assert_eq!(paths, table);
    }

    #[test]
    fn roles_decide_what_a_principal_may_call() {
        let principals = principals();
        let reader = bearer(READER_TOKEN);
        let admin = bearer(ADMIN_TOKEN);
        let allowed = decide(
            Some(&principals),
            "/kpi.v1.Query/GetAggregates",
            with_token(&reader),
        );
        assert_eq!(allowed.unwrap().unwrap().name.as_ref(), "dashboard");
        let denied = decide(
            Some(&principals),
            "/kpi.v1.Ingest/Record",
            with_token(&reader),
        );
        assert!(
            matches!(&denied, Err(Refusal::PermissionDenied(reason)) if reason.contains("writer") && reason.contains("dashboard")),
            "{denied:?}"
        );
        let admin_defines = decide(
            Some(&principals),
            "/kpi.v1.KpiCatalog/DefineKpi",
            with_token(&admin),
        );
        assert_eq!(admin_defines.unwrap().unwrap().name.as_ref(), "ops");
        // Reflection and unknown paths need a known principal, whatever its roles.
        assert!(
            decide(
                Some(&principals),
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                with_token(&reader)
            )
            .is_ok()
        );
    }

    #[test]
    fn requests_without_known_credentials_are_unauthenticated() {
        let principals = principals();
        let none = || Credentials {
            authorization: None,
            certificate_subject: None,
        };
        for path in [
            "/kpi.v1.Query/GetAggregates",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/nothing/Here",
        ] {
            assert!(
                matches!(
                    decide(Some(&principals), path, none()),
                    Err(Refusal::Unauthenticated(_))
                ),
                "{path}"
            );
        }
        for header in [
            &b"Bearer kpi_unknown"[..],
            b"Basic a2V5",
            b"Bearer ",
            READER_TOKEN.as_bytes(),
        ] {
            let refused = decide(
                Some(&principals),
                "/kpi.v1.Query/GetTrend",
                with_token(header),
            );
            assert!(
                matches!(refused, Err(Refusal::Unauthenticated(_))),
                "{header:?}"
            );
        }
        // The scheme is case-insensitive.
        let lower = format!("bearer {READER_TOKEN}");
        assert!(
            decide(
                Some(&principals),
                "/kpi.v1.Query/GetTrend",
                with_token(lower.as_bytes())
            )
            .is_ok()
        );
        // Health checks need nothing.
        assert_eq!(
            decide(Some(&principals), "/grpc.health.v1.Health/Check", none()),
            Ok(None)
        );
    }

    #[test]
    fn a_client_certificate_names_its_principal() {
        let principals = principals();
        let ops = Credentials {
            authorization: None,
            certificate_subject: Some("ops.example".into()),
        };
        assert_eq!(
            decide(Some(&principals), "/kpi.v1.Audit/VerifyLog", ops)
                .unwrap()
                .unwrap()
                .name
                .as_ref(),
            "ops"
        );
        let stranger = Credentials {
            authorization: None,
            certificate_subject: Some("stranger".into()),
        };
        assert!(matches!(
            decide(Some(&principals), "/kpi.v1.Audit/VerifyLog", stranger),
            Err(Refusal::Unauthenticated(_))
        ));
        // Without an auth file, the certificate's subject is the actor, with every role.
        let anyone = Credentials {
            authorization: None,
            certificate_subject: Some("stranger".into()),
        };
        let open = decide(None, "/kpi.v1.KpiCatalog/DefineKpi", anyone)
            .unwrap()
            .unwrap();
        assert_eq!(open.name.as_ref(), "stranger");
        assert!(Role::ALL.into_iter().all(|role| open.has(role)));
    }

    #[test]
    fn bad_auth_files_are_refused_with_the_entry_and_reason() {
        let hash = token_sha256("t");
        let cases = [
            (
                "[[principal]]\nname = \"\"\nroles = [\"reader\"]\ntoken_sha256 = \"HASH\"",
                "name",
            ),
            (
                "[[principal]]\nname = \"a\"\nroles = [\"root\"]\ntoken_sha256 = \"HASH\"",
                "unknown role 'root'",
            ),
            (
                "[[principal]]\nname = \"a\"\nroles = []\ntoken_sha256 = \"HASH\"",
                "at least one role",
            ),
            (
                "[[principal]]\nname = \"a\"\nroles = [\"reader\"]",
                "needs token_sha256",
            ),
            (
                "[[principal]]\nname = \"a\"\nroles = [\"reader\"]\ntoken_sha256 = \"abc\"",
                "64 hexadecimal",
            ),
            (
                "[[principal]]\nname = \"a\"\nroles = [\"reader\"]\ntoken = \"kpi_x\"",
                "unknown field",
            ),
            (
                "[[principal]]\nname = \"a\"\nroles = [\"reader\"]\ntoken_sha256 = \"HASH\"\n[[principal]]\nname = \"b\"\nroles = [\"reader\"]\ntoken_sha256 = \"HASH\"",
                "principal[1]: the same token_sha256",
            ),
        ];
        for (text, expected) in cases {
            let error = Principals::parse(&text.replace("HASH", &hash)).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn a_new_token_works_with_the_entry_printed_for_it() {
        let (token, entry) = new_token("ingest \"svc\"", &[Role::Writer]).unwrap();
        assert!(token.starts_with("kpi_") && token.len() > 40, "{token}");
        assert!(
            !entry.contains(&token),
            "the entry must not hold the token itself"
        );
        let principals = Principals::parse(&entry).unwrap();
        let header = bearer(&token);
        let principal = decide(
            Some(&principals),
            "/kpi.v1.Ingest/Record",
            with_token(&header),
        )
        .unwrap()
        .unwrap();
        assert_eq!(principal.name.as_ref(), "ingest \"svc\"");
        let (other, _) = new_token("ingest", &[Role::Writer]).unwrap();
        assert_ne!(token, other);
        assert!(new_token("", &[Role::Reader]).is_err());
        assert!(new_token("a", &[]).is_err());
    }
}

//! Cluster security: a cluster CA and node certificates (`shoal cert`), mutual TLS on every
//! gRPC connection between cluster members, a join token in every request, and no
//! plaintext beyond loopback unless asked for (`--insecure`). See `docs/security.md`.
//!
//! A process installs its [`Security`] once at start-up ([`install`]); every connection it
//! dials ([`Security::endpoint`] + [`Security::client_token`]) and every server it runs
//! ([`Security::server_tls`] + [`Security::require_token`]) follows it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Request metadata carrying the join token.
pub const TOKEN_HEADER: &str = "x-shoal-join-token";
/// The name every node certificate carries and every client verifies: membership is
/// proven by the cluster CA's signature, not by a host name.
pub const SERVER_NAME: &str = "shoal-node";

/// Files of a TLS directory (`shoal cert issue` writes all four).
pub const CA_CERT: &str = "ca.pem";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";
pub const TOKEN_FILE: &str = "join-token";
/// Files only the CA directory (`shoal cert init`) holds.
pub const CA_KEY: &str = "ca.key";
const CA_NAME: &str = "ca.name";

#[derive(Debug)]
pub enum SecurityError {
    Io { path: PathBuf, source: std::io::Error },
    Config(String),
    Cert(String),
}

impl std::fmt::Display for SecurityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecurityError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            SecurityError::Config(m) => f.write_str(m),
            SecurityError::Cert(m) => write!(f, "certificate: {m}"),
        }
    }
}

impl std::error::Error for SecurityError {}

impl From<rcgen::Error> for SecurityError {
    fn from(e: rcgen::Error) -> Self {
        SecurityError::Cert(e.to_string())
    }
}

type Result<T> = std::result::Result<T, SecurityError>;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| SecurityError::Io { path: path.to_path_buf(), source })
}

/// Writes `text` to `path`, readable by the owner only when `secret`.
fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let io = |source| SecurityError::Io { path: path.to_path_buf(), source };
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let _ = secret;
    let mut f = o.open(path).map_err(io)?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io)
}

/// How this process talks to the cluster.
#[derive(Clone, Debug, Default)]
pub struct Security {
    tls: Option<Tls>,
    token: Option<Arc<str>>,
    insecure: bool,
}

#[derive(Clone, Debug)]
struct Tls {
    dir: PathBuf,
    ca: String,
    cert: String,
    key: String,
}

impl Security {
    /// Loads `tls_dir` (`ca.pem`, `node.pem`, `node.key`, and `join-token` when `token` is
    /// not given). Without a directory: plaintext, allowed on loopback only unless
    /// `insecure`.
    pub fn load(tls_dir: Option<&Path>, token: Option<String>, insecure: bool) -> Result<Security> {
        let tls = match tls_dir {
            None => None,
            Some(dir) => Some(Tls {
                dir: dir.to_path_buf(),
                ca: read(&dir.join(CA_CERT))?,
                cert: read(&dir.join(NODE_CERT))?,
                key: read(&dir.join(NODE_KEY))?,
            }),
        };
        let token = match (token, tls_dir) {
            (Some(t), _) => Some(t),
            (None, Some(dir)) if dir.join(TOKEN_FILE).exists() => Some(read(&dir.join(TOKEN_FILE))?.trim().to_string()),
            _ => None,
        };
        if let Some(t) = &token
            && (t.is_empty() || MetadataValue::<Ascii>::try_from(t.as_str()).is_err())
        {
            return Err(SecurityError::Config("the join token must be non-empty printable ASCII".into()));
        }
        Ok(Security { tls, token: token.map(Arc::from), insecure })
    }

    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.dir.as_path())
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// Whether connections use mutual TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// An endpoint for `addr` (`HOST:PORT` or a URI): TLS with this node's certificate when
    /// configured; plaintext only to a loopback host unless `insecure`.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint> {
        let host_port = addr.split("://").last().unwrap_or(addr);
        let uri = format!("{}://{host_port}", if self.tls.is_some() { "https" } else { "http" });
        let bad = |e: tonic::transport::Error| SecurityError::Config(format!("address {addr}: {e}"));
        let ep = Endpoint::from_shared(uri).map_err(bad)?;
        match &self.tls {
            Some(t) => {
                let cfg = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&t.ca))
                    .identity(Identity::from_pem(&t.cert, &t.key))
                    .domain_name(SERVER_NAME);
                ep.tls_config(cfg).map_err(bad)
            }
            None if self.insecure || is_loopback_host(host_port) => Ok(ep),
            None => Err(SecurityError::Config(format!(
                "refusing plaintext gRPC to {addr}, which is not a loopback address: give --tls-dir \
                 (see `shoal cert`) or --insecure"
            ))),
        }
    }

    /// Checks that a server may listen on `addr` as configured.
    pub fn check_listen(&self, addr: SocketAddr) -> Result<()> {
        if self.tls.is_none() && !self.insecure && !addr.ip().is_loopback() {
            return Err(SecurityError::Config(format!(
                "refusing to serve plaintext gRPC on {addr}, which is not a loopback address: give \
                 --tls-dir (see `shoal cert`) or --insecure"
            )));
        }
        Ok(())
    }

    /// The server's TLS: this node's certificate, and client certificates required and
    /// checked against the cluster CA.
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        self.tls.as_ref().map(|t| {
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&t.cert, &t.key))
                .client_ca_root(Certificate::from_pem(&t.ca))
                .client_auth_optional(false)
        })
    }

    /// The interceptor that adds the join token to every request this process makes.
    pub fn client_token(&self) -> ClientToken {
        ClientToken(self.token.as_deref().and_then(|t| MetadataValue::try_from(t).ok()))
    }

    /// The interceptor a server puts in front of its services.
    pub fn require_token(&self) -> RequireToken {
        RequireToken(self.token.clone())
    }
}

/// Whether `host_port`'s host is a loopback address or `localhost`.
fn is_loopback_host(host_port: &str) -> bool {
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) => h,
        None => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Adds the join token to each request.
#[derive(Clone, Debug, Default)]
pub struct ClientToken(Option<MetadataValue<Ascii>>);

impl Interceptor for ClientToken {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(TOKEN_HEADER, t.clone());
        }
        Ok(req)
    }
}

/// Refuses requests without the cluster's join token (none required when none is set).
#[derive(Clone, Debug, Default)]
pub struct RequireToken(Option<Arc<str>>);

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got = req.metadata().get(TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if !constant_time_eq(got, want.as_bytes()) {
            return Err(Status::unauthenticated("missing or wrong join token"));
        }
        Ok(req)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A channel whose requests carry the join token.
pub type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientToken>;

/// Wraps a connected channel so its requests carry this process's join token.
pub fn with_token(ch: tonic::transport::Channel) -> Channel {
    tonic::service::interceptor::InterceptedService::new(ch, get().client_token())
}

static GLOBAL: OnceLock<Security> = OnceLock::new();

/// Sets this process's security; the first call wins. Without a call, [`get`] is plaintext
/// on loopback without a token.
pub fn install(s: Security) {
    let _ = GLOBAL.set(s);
}

pub fn get() -> &'static Security {
    static DEFAULT: OnceLock<Security> = OnceLock::new();
    GLOBAL.get().unwrap_or_else(|| DEFAULT.get_or_init(Security::default))
}

/// `n` random bytes as hex, from the kernel's generator.
pub fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let path = Path::new("/dev/urandom");
    let mut b = vec![0u8; n];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| SecurityError::Io { path: path.to_path_buf(), source })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Validity of new certificates: from the start of last year for ten years.
fn validity(p: &mut rcgen::CertificateParams) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let year = 1970 + (secs / 31_556_952) as i32;
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
}

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p
}

/// `shoal cert init`: a new cluster CA in `dir` (created; it must not hold one already):
/// `ca.pem`, `ca.key` (owner-only) and a fresh `join-token` (owner-only).
pub fn init_ca(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| SecurityError::Io { path: dir.to_path_buf(), source })?;
    if dir.join(CA_KEY).exists() {
        return Err(SecurityError::Config(format!("{} already holds a cluster CA", dir.display())));
    }
    let name = format!("shoal cluster CA {}", random_hex(8)?);
    let mut params = ca_params(&name);
    validity(&mut params);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write(&dir.join(CA_CERT), &cert.pem(), false)?;
    write(&dir.join(CA_NAME), &name, false)?;
    write(&dir.join(TOKEN_FILE), &random_hex(32)?, true)
}

/// `shoal cert issue`: a certificate for node `name` signed by the CA in `ca_dir`, written
/// with the CA certificate and the join token to `out` (created; it must not hold a node
/// certificate already), ready to copy to that node as its `--tls-dir`. `hosts` are extra
/// names or addresses to list in the certificate (informational: peers verify the CA's
/// signature and the name `shoal-node`).
pub fn issue(ca_dir: &Path, name: &str, hosts: &[String], out: &Path) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(SecurityError::Config(format!("node name {name:?}: use 1-64 letters, digits, '-', '_' or '.'")));
    }
    let ca_key = rcgen::KeyPair::from_pem(&read(&ca_dir.join(CA_KEY))?)?;
    let ca_name = read(&ca_dir.join(CA_NAME))?;
    let ca_cert = read(&ca_dir.join(CA_CERT))?;
    let token = read(&ca_dir.join(TOKEN_FILE))?;
    let issuer = rcgen::Issuer::new(ca_params(ca_name.trim()), ca_key);
    let mut sans = vec![SERVER_NAME.to_string(), name.to_string()];
    sans.extend(hosts.iter().cloned());
    let mut params = rcgen::CertificateParams::new(sans)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| SecurityError::Io { path: out.to_path_buf(), source })?;
    if out.join(NODE_KEY).exists() {
        return Err(SecurityError::Config(format!("{} already holds a node certificate", out.display())));
    }
    write(&out.join(NODE_KEY), &key.serialize_pem(), true)?;
    write(&out.join(NODE_CERT), &cert.pem(), false)?;
    write(&out.join(CA_CERT), &ca_cert, false)?;
    write(&out.join(TOKEN_FILE), token.trim(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1:7070", "localhost:1", "[::1]:9", "127.5.6.7:80"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["10.0.0.1:7070", "box.lan:1", "[fe80::1]:9", "0.0.0.0:80"] {
            assert!(!is_loopback_host(h), "{h}");
        }
        let plain = Security::default();
        assert!(plain.endpoint("127.0.0.1:1").is_ok());
        let e = plain.endpoint("10.1.2.3:7070").unwrap_err().to_string();
        assert!(e.contains("refusing plaintext gRPC to 10.1.2.3:7070"), "{e}");
        assert!(Security { insecure: true, ..Security::default() }.endpoint("10.1.2.3:7070").is_ok());
        assert!(plain.check_listen("0.0.0.0:7070".parse().unwrap()).is_err());
        assert!(plain.check_listen("127.0.0.1:7070".parse().unwrap()).is_ok());
    }

    #[test]
    fn token_check_is_exact() {
        let mut need = Security { token: Some("abc".into()), ..Security::default() }.require_token();
        let with = |t: Option<&str>| {
            let mut r = Request::new(());
            if let Some(t) = t {
                r.metadata_mut().insert(TOKEN_HEADER, t.parse().unwrap());
            }
            r
        };
        assert!(need.call(with(Some("abc"))).is_ok());
        for bad in [None, Some("abd"), Some("ab"), Some("abcd")] {
            assert_eq!(need.call(with(bad)).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(RequireToken::default().call(with(None)).is_ok());
    }

    #[test]
    fn init_and_issue_write_a_usable_bundle() {
        let base = std::env::temp_dir().join(format!("shoal-cert-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (ca, node) = (base.join("ca"), base.join("node"));
        init_ca(&ca).unwrap();
        assert!(init_ca(&ca).unwrap_err().to_string().contains("already holds a cluster CA"));
        issue(&ca, "gpu-box-1", &["10.0.0.5".into()], &node).unwrap();
        assert!(issue(&ca, "gpu-box-1", &[], &node).unwrap_err().to_string().contains("already holds"));
        assert!(issue(&ca, "bad name", &[], &base.join("x")).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [ca.join(CA_KEY), node.join(NODE_KEY), node.join(TOKEN_FILE)] {
                assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
            }
        }
        let s = Security::load(Some(&node), None, false).unwrap();
        assert!(s.is_tls());
        assert_eq!(s.token().unwrap().len(), 64);
        assert_eq!(s.token(), Some(std::fs::read_to_string(ca.join(TOKEN_FILE)).unwrap().trim()));
        assert!(s.server_tls().is_some());
        assert!(s.endpoint("10.0.0.5:7070").is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }
}

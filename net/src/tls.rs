//! TLS for the QUIC endpoints: the cluster CA and its certificates, and the quinn configs.
//!
//! One CA per cluster signs every node certificate (server and client auth, since a node both
//! serves and dials its peers) and a client certificate. Servers offer two ALPNs: [`ALPN_CLIENT`]
//! for ordinary clients, whose certificate is optional, and [`ALPN_PEER`] for nodes, which must
//! present one (the server checks `Connection::peer_identity()`; the TLS layer only checks that a
//! certificate, when given, chains to the cluster CA).
//!
//! Files follow a naming convention in one directory ([`ca_files`], [`node_files`],
//! [`client_files`]); private keys are written with mode 0600 and never overwritten.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN for client connections (submit, status).
pub const ALPN_CLIENT: &[u8] = b"baton/1";
/// ALPN for node-to-node connections (Raft, forwarding); requires a client certificate.
pub const ALPN_PEER: &[u8] = b"baton-peer/1";

/// Most nodes [`generate`] makes certificates for.
pub const NODES_MAX: u64 = 1024;
/// Longest validity (and backdating) accepted, in days (100 years).
pub const VALIDITY_DAYS_MAX: u32 = 36_500;
/// Longest cluster id, in bytes (the CA's common name must stay within 64 characters).
pub const CLUSTER_ID_BYTES_MAX: usize = 48;
/// Most extra subject alternative names per node certificate.
pub const EXTRA_SANS_MAX: usize = 64;
/// Largest PEM file read, in bytes.
pub const PEM_BYTES_MAX: u64 = 1 << 20;

/// Validity starts this long before "now", so nodes with slightly slow clocks accept new certs.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Connection idle timeout, in milliseconds: how long a killed peer or node (whose port answers
/// nothing, not even a stateless reset) holds up the requests on its connection.
pub const IDLE_TIMEOUT_MS: u32 = 3_000;
/// Keep-alive interval, in milliseconds (well under the idle timeout).
pub const KEEP_ALIVE_INTERVAL_MS: u64 = 500;
/// Bidirectional streams a peer may have open at once.
pub const BIDI_STREAMS_MAX: u32 = 1024;
/// Per-stream receive window in bytes: room for a few maximum (4 MiB) frames in flight.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Per-connection receive window in bytes.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;
/// Per-connection send window in bytes.
pub const CONNECTION_SEND_WINDOW_BYTES: u64 = 64 << 20;

/// Everything that can go wrong making, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// A file or directory could not be written.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// [`generate`] refuses to replace an existing file (it may hold a cluster's CA).
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    /// A PEM file is larger than [`PEM_BYTES_MAX`].
    #[error("{path} is larger than {bytes_max} bytes")]
    TooLarge { path: PathBuf, bytes_max: u64 },
    /// A PEM file could not be parsed.
    #[error("parsing PEM in {path}: {source}")]
    Pem { path: PathBuf, source: pem::Error },
    /// A PEM file holds no certificate.
    #[error("no certificate in {path}")]
    NoCertificate { path: PathBuf },
    /// A PEM file holds no private key.
    #[error("no private key in {path}")]
    NoKey { path: PathBuf },
    /// A CA file holds a certificate that cannot be a trust anchor.
    #[error("CA certificate in {path} is unusable: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    /// A certificate and key do not make a usable identity (e.g. they do not match).
    #[error("identity {cert} / {key} is unusable: {source}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// rcgen failed to make a key or certificate.
    #[error("generating {what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    /// An extra subject alternative name is neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {san:?}: {source}")]
    InvalidSan { san: String, source: rcgen::Error },
    /// rustls refused a configuration.
    #[error("rustls {what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    /// A certificate made with the CA key in a directory does not verify against the CA
    /// certificate there: the CA was made for another cluster id (or the files do not match).
    #[error("a certificate signed with the CA key does not verify against {ca} (is the cluster id {cluster_id:?} the CA's?): {source}")]
    NotFromCa {
        ca: PathBuf,
        cluster_id: String,
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built.
    #[error("building the client certificate verifier: {0}")]
    ClientVerifier(VerifierBuilderError),
    /// The server certificate verifier could not be built.
    #[error("building the server certificate verifier: {0}")]
    ServerVerifier(VerifierBuilderError),
    /// The crypto provider lacks the cipher suite QUIC's initial packets need.
    #[error("QUIC: {0}")]
    Quic(NoInitialCipherSuite),
    /// An option is out of range.
    #[error("invalid {option} {value:?}: {why}")]
    InvalidOption {
        option: &'static str,
        value: String,
        why: &'static str,
    },
}

/// What [`generate`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertOptions {
    /// Names the cluster in the CA's common name ("baton cluster <cluster_id>").
    pub cluster_id: String,
    /// Node certificates for ids 1..=nodes.
    pub nodes: u64,
    /// Extra subject alternative names for every node: IP addresses, else DNS names.
    pub extra_sans: Vec<String>,
    /// Length of the validity window, in days.
    pub validity_days: u32,
    /// The window starts this many days ago (0: now); more than `validity_days` makes an
    /// already-expired set, for tests.
    pub not_before_days_ago: u32,
}

impl CertOptions {
    /// Options for `nodes` nodes of `cluster_id`: valid from now for 365 days, no extra SANs.
    pub fn new(cluster_id: impl Into<String>, nodes: u64) -> CertOptions {
        CertOptions {
            cluster_id: cluster_id.into(),
            nodes,
            extra_sans: Vec::new(),
            validity_days: 365,
            not_before_days_ago: 0,
        }
    }

    fn validate(&self) -> Result<(), TlsError> {
        let invalid =
            |option, value: String, why| Err(TlsError::InvalidOption { option, value, why });
        let id_ok = self
            .cluster_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if self.cluster_id.is_empty() || self.cluster_id.len() > CLUSTER_ID_BYTES_MAX || !id_ok {
            return invalid(
                "cluster id",
                self.cluster_id.clone(),
                "must be 1 to 48 characters of A-Z a-z 0-9 - _ .",
            );
        }
        if self.nodes == 0 || self.nodes > NODES_MAX {
            return invalid("nodes", self.nodes.to_string(), "must be 1 to 1024");
        }
        if self.validity_days == 0 || self.validity_days > VALIDITY_DAYS_MAX {
            return invalid(
                "validity days",
                self.validity_days.to_string(),
                "must be 1 to 36500",
            );
        }
        if self.not_before_days_ago > VALIDITY_DAYS_MAX {
            return invalid(
                "not-before days ago",
                self.not_before_days_ago.to_string(),
                "must be at most 36500",
            );
        }
        if self.extra_sans.len() > EXTRA_SANS_MAX {
            return invalid(
                "extra SAN count",
                self.extra_sans.len().to_string(),
                "must be at most 64",
            );
        }
        Ok(())
    }
}

/// The files [`generate`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The cluster CA private key (PEM, mode 0600); needed only to sign more certificates.
    pub ca_key: PathBuf,
    /// Per node: id, certificate, private key.
    pub nodes: Vec<(u64, PathBuf, PathBuf)>,
    /// The client certificate (PEM).
    pub client_cert: PathBuf,
    /// The client private key (PEM, mode 0600).
    pub client_key: PathBuf,
}

impl CertFiles {
    /// The paths for a cluster of `nodes` nodes in `dir`, by convention.
    pub fn in_dir(dir: &Path, nodes: u64) -> CertFiles {
        let (ca_cert, ca_key) = ca_files(dir);
        let (client_cert, client_key) = client_files(dir);
        let nodes = (1..=nodes)
            .map(|id| {
                let (cert, key) = node_files(dir, id);
                (id, cert, key)
            })
            .collect();
        CertFiles {
            ca_cert,
            ca_key,
            nodes,
            client_cert,
            client_key,
        }
    }

    /// Certificate and key of node `id`, if there is one.
    pub fn node(&self, id: u64) -> Option<(&Path, &Path)> {
        self.nodes
            .iter()
            .find(|(n, _, _)| *n == id)
            .map(|(_, cert, key)| (cert.as_path(), key.as_path()))
    }

    /// Every path, CA first, then nodes by id, then the client.
    pub fn paths(&self) -> Vec<&Path> {
        let mut out = vec![self.ca_cert.as_path(), self.ca_key.as_path()];
        for (_, cert, key) in &self.nodes {
            out.push(cert);
            out.push(key);
        }
        out.push(&self.client_cert);
        out.push(&self.client_key);
        out
    }
}

/// `dir/ca.pem` and `dir/ca.key`.
pub fn ca_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// `dir/node-<id>.pem` and `dir/node-<id>.key`.
pub fn node_files(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{id}.pem")),
        dir.join(format!("node-{id}.key")),
    )
}

/// `dir/client.pem` and `dir/client.key`.
pub fn client_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("client.pem"), dir.join("client.key"))
}

/// Makes a cluster CA, node certificates for ids 1..=`opts.nodes` and a client certificate in
/// `out_dir` (created if missing). Refuses to overwrite any existing file. Everything is
/// generated in memory before the first file is written.
pub fn generate(out_dir: &Path, opts: &CertOptions) -> Result<CertFiles, TlsError> {
    opts.validate()?;
    let files = CertFiles::in_dir(out_dir, opts.nodes);
    for path in files.paths() {
        if path.symlink_metadata().is_ok() {
            return Err(TlsError::Exists {
                path: path.to_path_buf(),
            });
        }
    }
    let sans = node_sans(&opts.extra_sans)?;

    let ca_key = new_key("the CA key")?;
    let ca = ca_params(opts)?
        .self_signed(&ca_key)
        .map_err(rcgen_err("the CA certificate"))?;
    // (path, contents, private)
    let mut outputs = vec![
        (files.ca_cert.clone(), ca.pem(), false),
        (files.ca_key.clone(), ca_key.serialize_pem(), true),
    ];
    for (id, cert_path, key_path) in &files.nodes {
        let (cert, key) = node_cert(opts, &sans, *id, &ca, &ca_key)?;
        outputs.push((cert_path.clone(), cert.pem(), false));
        outputs.push((key_path.clone(), key.serialize_pem(), true));
    }
    let params = leaf_params(opts, "baton client", Vec::new(), false)?;
    let key = new_key("the client key")?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(rcgen_err("the client certificate"))?;
    outputs.push((files.client_cert.clone(), cert.pem(), false));
    outputs.push((files.client_key.clone(), key.serialize_pem(), true));

    fs::create_dir_all(out_dir).map_err(|source| TlsError::Write {
        path: out_dir.to_path_buf(),
        source,
    })?;
    for (path, contents, private) in &outputs {
        write_new(path, contents.as_bytes(), *private)?;
    }
    Ok(files)
}

/// Node `id`'s certificate and key, signed by `ca`. The node's identity name binds the
/// certificate to its node id (checked against the id a peer announces in its hello); the
/// client certificate has none.
fn node_cert(
    opts: &CertOptions,
    sans: &[SanType],
    id: u64,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    let what = format!("node {id}'s certificate");
    let mut node_sans = sans.to_vec();
    let identity = node_identity_name(id);
    node_sans.push(SanType::DnsName(identity.as_str().try_into().map_err(
        |source| TlsError::InvalidSan {
            san: identity.clone(),
            source,
        },
    )?));
    let params = leaf_params(opts, &format!("baton node {id}"), node_sans, true)?;
    let key = new_key(&what)?;
    let cert = params
        .signed_by(&key, ca, ca_key)
        .map_err(rcgen_err(&what))?;
    Ok((cert, key))
}

/// Makes a certificate and key for node `id` (1..=[`NODES_MAX`]) in `dir`, signed by the
/// cluster CA already there (`ca.pem`, `ca.key`, as [`generate`] wrote them): for a node that
/// joins a running cluster. `opts.cluster_id` must be the one the CA was made for (rcgen cannot
/// read a certificate back, so the CA's name is made again from it, with the CA's own key); the
/// new certificate is verified against `ca.pem` before anything is written, so a wrong cluster
/// id is refused. `opts.nodes` is not used. Refuses to overwrite existing files.
pub fn issue_node(dir: &Path, id: u64, opts: &CertOptions) -> Result<(PathBuf, PathBuf), TlsError> {
    CertOptions {
        nodes: 1,
        ..opts.clone()
    }
    .validate()?;
    if id == 0 || id > NODES_MAX {
        return Err(TlsError::InvalidOption {
            option: "node id",
            value: id.to_string(),
            why: "must be 1 to 1024",
        });
    }
    let (cert_path, key_path) = node_files(dir, id);
    for path in [&cert_path, &key_path] {
        if path.symlink_metadata().is_ok() {
            return Err(TlsError::Exists { path: path.clone() });
        }
    }
    let (ca_cert_path, ca_key_path) = ca_files(dir);
    let ca_key_pem = String::from_utf8(read_pem(&ca_key_path)?).map_err(|_| TlsError::NoKey {
        path: ca_key_path.clone(),
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(rcgen_err("reading the CA key"))?;
    let ca = ca_params(opts)?
        .self_signed(&ca_key)
        .map_err(rcgen_err("the CA certificate"))?;
    let (cert, key) = node_cert(opts, &node_sans(&opts.extra_sans)?, id, &ca, &ca_key)?;

    // The CA on disk must accept the new certificate.
    let roots = Arc::new(load_roots(&ca_cert_path)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(TlsError::ClientVerifier)?;
    verifier
        .verify_client_cert(cert.der(), &[], rustls_pki_types::UnixTime::now())
        .map_err(|source| TlsError::NotFromCa {
            ca: ca_cert_path.clone(),
            cluster_id: opts.cluster_id.clone(),
            source,
        })?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    Ok((cert_path, key_path))
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |source| TlsError::Rcgen {
        what: what.to_string(),
        source,
    }
}

fn new_key(what: &str) -> Result<KeyPair, TlsError> {
    // ECDSA P-256: small, fast, and supported by every TLS 1.3 stack.
    KeyPair::generate().map_err(rcgen_err(what))
}

/// The DNS name in node `id`'s certificate that identifies it as that node.
pub fn node_identity_name(id: u64) -> String {
    format!("node-{id}.baton")
}

/// `f` of the leaf of a certificate chain a peer presented (`quinn::Connection::peer_identity`,
/// already verified against the cluster CA by rustls); false when there is no parsable leaf.
fn leaf_matches(
    identity: &dyn std::any::Any,
    f: impl FnOnce(&webpki::EndEntityCert<'_>) -> bool,
) -> bool {
    let Some(chain) = identity.downcast_ref::<Vec<CertificateDer<'static>>>() else {
        return false;
    };
    let Some(leaf) = chain.first() else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf).is_ok_and(|cert| f(&cert))
}

/// True when the certificate chain a peer presented (`quinn::Connection::peer_identity`, already
/// verified against the cluster CA by rustls) belongs to node `id`.
pub fn is_node_certificate(identity: &dyn std::any::Any, id: u64) -> bool {
    let Ok(name) = rustls_pki_types::ServerName::try_from(node_identity_name(id)) else {
        return false;
    };
    leaf_matches(identity, |cert| {
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    })
}

/// True when the certificate chain a client presented (`quinn::Connection::peer_identity`,
/// verified by rustls) is a node's: its leaf names some `node-<id>.baton`. Membership changes are
/// refused to node certificates, so that a node's key (which every node host holds, and which
/// stays valid after the node is removed) cannot change the membership.
pub fn names_a_node(identity: &dyn std::any::Any) -> bool {
    // Classifying a certificate already verified, not verifying a name.
    leaf_matches(identity, |cert| {
        cert.valid_dns_names().any(|n| {
            n.strip_prefix("node-")
                .and_then(|rest| rest.strip_suffix(".baton"))
                .is_some_and(|id| id.parse::<u64>().is_ok())
        })
    })
}

/// 127.0.0.1, ::1, localhost, then the extra names (IP if it parses, else DNS).
fn node_sans(extra: &[String]) -> Result<Vec<SanType>, TlsError> {
    let mut sans = vec![
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
        SanType::DnsName(
            "localhost"
                .try_into()
                .map_err(|source| TlsError::InvalidSan {
                    san: "localhost".into(),
                    source,
                })?,
        ),
    ];
    for san in extra {
        let parsed = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.as_str().try_into().map_err(|source| {
                TlsError::InvalidSan {
                    san: san.clone(),
                    source,
                }
            })?),
        };
        if !sans.contains(&parsed) {
            sans.push(parsed);
        }
    }
    Ok(sans)
}

/// Sets the validity window from `opts` (rcgen's dates are `time::OffsetDateTime`, reached via
/// `From<SystemTime>` so baton needs no direct `time` dependency).
fn set_validity(params: &mut CertificateParams, opts: &CertOptions) -> Result<(), TlsError> {
    let not_before = SystemTime::now()
        .checked_sub(CLOCK_SKEW_ALLOWANCE + DAY * opts.not_before_days_ago)
        .ok_or_else(|| TlsError::InvalidOption {
            option: "not-before days ago",
            value: opts.not_before_days_ago.to_string(),
            why: "reaches before the clock's range",
        })?;
    let not_after = not_before
        .checked_add(DAY * opts.validity_days)
        .ok_or_else(|| TlsError::InvalidOption {
            option: "validity days",
            value: opts.validity_days.to_string(),
            why: "reaches past the clock's range",
        })?;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(())
}

fn ca_params(opts: &CertOptions) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    set_validity(&mut params, opts)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("baton cluster {}", opts.cluster_id),
    );
    // Signs leaves only, never intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn leaf_params(
    opts: &CertOptions,
    common_name: &str,
    sans: Vec<SanType>,
    server: bool,
) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    set_validity(&mut params, opts)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Creates `path` (never replacing a file) and writes `contents`; private files get mode 0600
/// before any byte is written.
fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    // The umask may have narrowed the mode; make it exact.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_err)?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(read_err)?
        .take(PEM_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > PEM_BYTES_MAX {
        return Err(TlsError::TooLarge {
            path: path.to_path_buf(),
            bytes_max: PEM_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// Every certificate in a PEM file, in order; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        source => TlsError::Pem {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// A root store holding every certificate in the CA file.
pub fn load_roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca_path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The transport settings every baton endpoint uses, server and client alike.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))))
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_INTERVAL_MS)))
        .max_concurrent_bidi_streams(VarInt::from_u32(BIDI_STREAMS_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(CONNECTION_SEND_WINDOW_BYTES);
    transport
}

/// A node's server config: presents `cert`/`key`, offers [`ALPN_CLIENT`] and [`ALPN_PEER`],
/// and verifies client certificates against the CA in `ca` when one is presented (optional:
/// the caller refuses peer connections without one).
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ServerConfig, TlsError> {
    let roots = Arc::new(load_roots(ca)?);
    let chain = load_certs(cert)?;
    let private_key = load_key(key)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::ClientVerifier)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "server protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    tls.alpn_protocols = vec![ALPN_CLIENT.to_vec(), ALPN_PEER.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A node's config for dialing peers: verifies the server against `ca`, presents
/// `cert`/`key` (mutual TLS), ALPN [`ALPN_PEER`].
pub fn peer_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ClientConfig, TlsError> {
    quic_client_config(ca, Some((cert, key)), ALPN_PEER)
}

/// A client's config: verifies the server against `ca`, presents `identity` (certificate,
/// key) when given, ALPN [`ALPN_CLIENT`].
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<quinn::ClientConfig, TlsError> {
    quic_client_config(ca, identity, ALPN_CLIENT)
}

/// A client configuration offering `alpn` (tests of refused connections use it).
pub fn quic_client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let roots = Arc::new(load_roots(ca)?);
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(TlsError::ServerVerifier)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "client protocol versions",
            source,
        })?
        .with_webpki_verifier(verifier);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|source| TlsError::Identity {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?,
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The server name to dial `addr` with: its IP literal, which matches the node certificates'
/// IP subject alternative names.
pub fn server_name(addr: &SocketAddr) -> String {
    addr.ip().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn generate_writes_every_file_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let mut opts = CertOptions::new("test", 3);
        opts.extra_sans = vec!["10.0.0.7".into(), "node.example".into()];
        let files = generate(&out, &opts).expect("generate");

        assert_eq!(files, CertFiles::in_dir(&out, 3));
        assert_eq!(files.paths().len(), 2 + 2 * 3 + 2);
        for path in files.paths() {
            assert!(path.is_file(), "{} missing", path.display());
        }
        for key in [&files.ca_key, &files.client_key] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
            load_key(key).expect("key loads");
        }
        for id in 1..=3 {
            let (cert, key) = files.node(id).expect("node files");
            assert_eq!(
                (cert.to_path_buf(), key.to_path_buf()),
                node_files(&out, id)
            );
            assert_eq!(mode(key), 0o600);
            assert_eq!(load_certs(cert).expect("certs").len(), 1);
            load_key(key).expect("key loads");
        }
        assert!(files.node(4).is_none());
        assert_eq!(load_roots(&files.ca_cert).expect("roots").len(), 1);
        assert_eq!(load_certs(&files.client_cert).expect("certs").len(), 1);

        // The configs build from the files (certificates and keys match).
        let (cert, key) = files.node(2).expect("node 2");
        server_config(&files.ca_cert, cert, key).expect("server config");
        peer_client_config(&files.ca_cert, cert, key).expect("peer config");
        client_config(&files.ca_cert, None).expect("client config");
        client_config(
            &files.ca_cert,
            Some((&files.client_cert, &files.client_key)),
        )
        .expect("client config with identity");
    }

    /// A node certificate issued later by the CA on disk verifies like the first ones and names
    /// its node; a wrong cluster id or an existing file is refused before anything is written.
    #[test]
    fn issue_node_signs_with_the_existing_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = CertOptions::new("prod-a", 3);
        generate(dir.path(), &opts).expect("generate");

        let wrong = issue_node(dir.path(), 4, &CertOptions::new("prod-b", 1));
        assert!(
            matches!(wrong, Err(TlsError::NotFromCa { .. })),
            "{wrong:?}"
        );
        assert!(!node_files(dir.path(), 4).0.exists());
        assert!(!node_files(dir.path(), 4).1.exists());

        let (cert, key) = issue_node(dir.path(), 4, &opts).expect("issue node 4");
        assert_eq!((cert.clone(), key.clone()), node_files(dir.path(), 4));
        assert_eq!(mode(&key), 0o600);
        let chain = load_certs(&cert).expect("cert");
        let identity: Box<dyn std::any::Any> = Box::new(chain);
        assert!(is_node_certificate(identity.as_ref(), 4));
        assert!(!is_node_certificate(identity.as_ref(), 3));
        assert!(names_a_node(identity.as_ref()));
        let client: Box<dyn std::any::Any> =
            Box::new(load_certs(&client_files(dir.path()).0).expect("client cert"));
        assert!(!names_a_node(client.as_ref()));
        // Usable as a node's identity with the cluster's CA.
        let (ca, _) = ca_files(dir.path());
        server_config(&ca, &cert, &key).expect("server config");
        peer_client_config(&ca, &cert, &key).expect("peer config");

        assert!(matches!(
            issue_node(dir.path(), 4, &opts),
            Err(TlsError::Exists { .. })
        ));
        assert!(matches!(
            issue_node(dir.path(), 0, &opts),
            Err(TlsError::InvalidOption { .. })
        ));
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &CertOptions::new("a", 1)).expect("first");
        let before = fs::read(dir.path().join("ca.key")).expect("read");
        match generate(dir.path(), &CertOptions::new("a", 1)) {
            Err(TlsError::Exists { path }) => assert_eq!(path, dir.path().join("ca.pem")),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(fs::read(dir.path().join("ca.key")).expect("read"), before);
    }

    #[test]
    fn invalid_options_are_refused_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        let mut cases = vec![CertOptions::new("x", 0), CertOptions::new("", 1)];
        cases.push(CertOptions::new("has space", 1));
        cases.push(CertOptions {
            validity_days: 0,
            ..CertOptions::new("x", 1)
        });
        cases.push(CertOptions {
            extra_sans: vec!["bad name\u{e9}".into()],
            ..CertOptions::new("x", 1)
        });
        for opts in cases {
            let err = generate(&out, &opts).expect_err("must refuse");
            assert!(
                matches!(
                    err,
                    TlsError::InvalidOption { .. } | TlsError::InvalidSan { .. }
                ),
                "{err}"
            );
            assert!(!out.exists());
        }
    }

    #[test]
    fn load_reports_missing_items() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = generate(dir.path(), &CertOptions::new("x", 1)).expect("generate");
        assert!(matches!(
            load_certs(&files.ca_key),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_key(&files.ca_cert),
            Err(TlsError::NoKey { .. })
        ));
        assert!(matches!(
            load_certs(&dir.path().join("absent.pem")),
            Err(TlsError::Read { .. })
        ));
        let (cert, _) = node_files(dir.path(), 1);
        let (_, other_key) = client_files(dir.path());
        assert!(matches!(
            server_config(&files.ca_cert, &cert, &other_key),
            Err(TlsError::Identity { .. })
        ));
    }

    #[test]
    fn server_name_is_the_ip_literal() {
        let v4: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
        let v6: SocketAddr = "[::1]:4433".parse().expect("addr");
        assert_eq!(server_name(&v4), "127.0.0.1");
        assert_eq!(server_name(&v6), "::1");
    }
}

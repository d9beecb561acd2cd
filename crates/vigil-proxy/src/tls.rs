//! TLS for the proxy's listener: a certificate per host, chosen by SNI, read from a
//! directory and reloaded when its files change.
//!
//! The directory holds PEM pairs named after the host they serve:
//! `app.example.com.crt` with `app.example.com.key`; `_wildcard.example.com.crt`
//! (and `.key`) serves `*.example.com`; `default.crt` (and `.key`) serves clients
//! that send no SNI or a name with no certificate of its own. Without a default,
//! such handshakes fail.
//!
//! With client CAs ([`ClientCas`], a PEM bundle, also reloaded on change) the
//! listener asks every client for a certificate. A client may send none (it then
//! authenticates some other way), but one that does not chain to a client CA, or
//! is expired, fails the handshake.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The certificates of one reading of the directory.
#[derive(Debug, Default)]
struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the domain under the `*`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// The files read, to notice changes.
    stamp: Stamp,
}

/// Each `.crt` and `.key` file with its modification time and length, sorted.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// Picks each handshake's certificate by SNI from the current reading of the directory.
#[derive(Debug)]
pub struct CertStore {
    dir: PathBuf,
    certs: ArcSwap<Certs>,
}

fn stamp_of(dir: &Path) -> Result<Stamp, String> {
    read_stamp(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn read_stamp(dir: &Path) -> std::io::Result<Stamp> {
    let mut stamp = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("crt" | "key")
        ) {
            let meta = entry.metadata()?;
            stamp.push((path, meta.modified().ok(), meta.len()));
        }
    }
    stamp.sort();
    Ok(stamp)
}

fn certified_key(crt: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(crt)
        .map_err(|e| format!("{}: {e}", crt.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", crt.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", crt.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("{}: {e}", crt.display()))
}

/// Loads the pairs of `dir`, whose files are `stamp` (see [`stamp_of`]).
fn load(dir: &Path, stamp: Stamp) -> Result<Certs, String> {
    let mut certs = Certs::default();
    for (path, _, _) in &stamp {
        if path.extension().and_then(|e| e.to_str()) != Some("crt") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let key = path.with_extension("key");
        let ck = Arc::new(certified_key(path, &key)?);
        let name = stem.to_ascii_lowercase();
        if name == "default" {
            certs.default = Some(ck);
        } else if let Some(domain) = name.strip_prefix("_wildcard.") {
            certs.wildcard.insert(domain.to_owned(), ck);
        } else {
            certs.exact.insert(name, ck);
        }
    }
    if certs.exact.is_empty() && certs.wildcard.is_empty() && certs.default.is_none() {
        return Err(format!(
            "{}: no certificate (`<host>.crt` with `<host>.key`)",
            dir.display()
        ));
    }
    certs.stamp = stamp;
    Ok(certs)
}

impl CertStore {
    /// Reads `dir`; fails when a pair does not load or there is none.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Arc<CertStore>, String> {
        let dir = dir.into();
        let certs = load(&dir, stamp_of(&dir)?)?;
        Ok(Arc::new(CertStore {
            dir,
            certs: ArcSwap::from_pointee(certs),
        }))
    }

    /// Reads the directory again if any file changed; a reading that fails keeps the
    /// certificates in use (and says why).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamp_of(&self.dir)?;
        if now == self.certs.load().stamp {
            return Ok(false);
        }
        self.certs.store(Arc::new(load(&self.dir, now)?));
        Ok(true)
    }

    /// Checks the directory every `every` for changed files, for as long as the runtime runs.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let store = self.clone();
        watch_reloads(
            every,
            "TLS certificates",
            self.dir.display().to_string(),
            move || store.reload_if_changed(),
        );
    }

    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(ck) = certs.exact.get(&name) {
                return Some(ck.clone());
            }
            // `*.example.com` covers exactly one label more (RFC 6125).
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(ck) = certs.wildcard.get(parent) {
                    return Some(ck.clone());
                }
            }
        }
        certs.default.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The CAs client certificates must chain to, read from a PEM bundle and reloaded
/// when the file changes. Verifies like rustls's `WebPkiClientVerifier` with
/// unauthenticated clients allowed, over the bundle of the moment.
#[derive(Debug)]
pub struct ClientCas {
    path: PathBuf,
    current: ArcSwap<CaBundle>,
}

#[derive(Debug)]
struct CaBundle {
    verifier: Arc<dyn ClientCertVerifier>,
    /// The file's modification time and length when read.
    stamp: (Option<SystemTime>, u64),
}

fn file_stamp(path: &Path) -> Result<(Option<SystemTime>, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((meta.modified().ok(), meta.len()))
}

fn load_cas(path: &Path) -> Result<CaBundle, String> {
    let stamp = file_stamp(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: a CA certificate is not usable: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in it", path.display()));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    // The CAs are not named to clients: the names would have to follow reloads.
    // A client offers whatever certificate it has.
    .clear_root_hint_subjects()
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(CaBundle { verifier, stamp })
}

impl ClientCas {
    /// Reads the bundle at `path`; fails when it holds no usable CA certificate.
    pub fn open(path: impl Into<PathBuf>) -> Result<Arc<ClientCas>, String> {
        let path = path.into();
        let bundle = load_cas(&path)?;
        Ok(Arc::new(ClientCas {
            path,
            current: ArcSwap::from_pointee(bundle),
        }))
    }

    /// Reads the bundle again if the file changed; a reading that fails keeps the
    /// CAs in use (and says why).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        if file_stamp(&self.path)? == self.current.load().stamp {
            return Ok(false);
        }
        self.current.store(Arc::new(load_cas(&self.path)?));
        Ok(true)
    }

    /// Checks the file every `every` for changes, for as long as the runtime runs.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let cas = self.clone();
        watch_reloads(
            every,
            "client CAs",
            self.path.display().to_string(),
            move || cas.reload_if_changed(),
        );
    }
}

impl ClientCertVerifier for ClientCas {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().verifier.supported_verify_schemes()
    }
}

/// A rustls server configuration over `store`, offering HTTP/2 and HTTP/1.1; with
/// `client_cas`, asking clients for a certificate (see [`ClientCas`]).
pub fn server_config(
    store: Arc<CertStore>,
    client_cas: Option<Arc<ClientCas>>,
) -> Result<rustls::ServerConfig, String> {
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?;
    let builder = match client_cas {
        Some(cas) => builder.with_client_cert_verifier(cas),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Calls `reload` (blocking file reads) every `every` for as long as the runtime
/// runs, logging what it did to `what` (read from `from`); a failed reading keeps
/// what is in use.
fn watch_reloads(
    every: Duration,
    what: &'static str,
    from: String,
    reload: impl Fn() -> Result<bool, String> + Send + Sync + 'static,
) {
    let reload = Arc::new(reload);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = reload.clone();
            match tokio::task::spawn_blocking(move || r()).await {
                Ok(Ok(true)) => tracing::info!(from = %from, "Reloaded the {what}"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "The {what} were not reloaded; the ones in use stay")
                }
                Err(e) => tracing::warn!(error = %e, "The {what} reload task failed"),
            }
        }
    });
}

//! `vigil`: the control plane, the proxy and the all-in-one in one binary.

mod allinone;
mod config;
mod keys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use vigil_control::{Control, ControlConfig};
use vigil_store::{Store, StoreOptions};

/// jemalloc rather than glibc's malloc: see its entry in Cargo.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Zero-trust access: control plane and identity-aware proxy",
    after_help = "Settings come from flags, then VIGIL_* environment variables, then the \
                  YAML file given by --config (one section per subcommand, keys named as \
                  the flags). Every secret can also be read from a file: --<name>-file or \
                  VIGIL_<NAME>_FILE."
)]
struct Cli {
    /// YAML configuration file: a section per subcommand (`control:`, `proxy:`,
    /// `migrate:`, `all-in-one:`) whose keys are the flags' names.
    #[arg(long, env = "VIGIL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long, global = true)]
    print_config: bool,
    /// How log lines are written: `text` (key=value) or `json` (one object per
    /// line, fields at the top level, for log collectors).
    #[arg(long, env = "VIGIL_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The log's line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `2026-12-04T02:30:07Z  INFO decision request_id=… decision=allow …`
    Text,
    /// `{"timestamp":…,"level":"INFO","message":"decision","request_id":…,"target":"vigil::decision"}`
    Json,
}

impl LogFormat {
    /// The value as the flag and the file spell it.
    fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: the admin REST API over the store, and the
    /// snapshot stream proxies subscribe to.
    Control(ControlArgs),
    /// Run an identity-aware proxy: subscribe to the control plane's snapshots and
    /// authorize every request from the one held.
    Proxy(ProxyArgs),
    /// The control plane on an embedded SQLite store and one proxy, in one
    /// process, with development keys: for a first run and small sites.
    AllInOne(allinone::AllInOneArgs),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Key material.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the version and exit.
    Version,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate every key a deployment needs: the snapshot signing key (and the
    /// public key proxies trust), the secret-at-rest key, a cookie key, the
    /// assertion key, a bootstrap admin token and a fleet join token.
    Generate(keys::GenerateArgs),
}

#[derive(Args, Serialize, Clone)]
pub(crate) struct ProxyArgs {
    /// Address the proxy serves on: HTTPS with `--tls-dir`, else plain HTTP (for
    /// development, or behind a TLS-terminating load balancer).
    #[arg(long, env = "VIGIL_PROXY_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Directory of certificates chosen by SNI: `<host>.crt` + `<host>.key` (PEM),
    /// `_wildcard.<domain>.*` for `*.<domain>`, `default.*` for the rest; reloaded on change.
    #[arg(long, env = "VIGIL_PROXY_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// CA certificates (PEM bundle) that client certificates must chain to, reloaded
    /// on change (needs `--tls-dir`). Clients are then asked for a certificate: one
    /// without may still use a bearer token or cookie; an untrusted or expired one
    /// fails the handshake.
    #[arg(long, env = "VIGIL_CLIENT_CA_FILE", requires = "tls_dir")]
    pub client_ca_file: Option<PathBuf>,
    /// A plain-HTTP address that only redirects to HTTPS (needs `--tls-dir`).
    #[arg(long, env = "VIGIL_PROXY_REDIRECT_LISTEN", requires = "tls_dir")]
    pub redirect_listen: Option<SocketAddr>,
    /// The HTTPS port the redirect sends browsers to, when it is not `--listen`'s
    /// (behind a load balancer or a Kubernetes Service mapping 443 to 8443).
    #[arg(
        long,
        env = "VIGIL_PROXY_REDIRECT_HTTPS_PORT",
        requires = "redirect_listen"
    )]
    pub redirect_https_port: Option<u16>,
    /// Address of `/healthz`, `/readyz` and `/metrics`, apart from proxied traffic.
    #[arg(
        long,
        env = "VIGIL_PROXY_HEALTH_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    pub health_listen: SocketAddr,
    /// Control-plane gRPC addresses (`https://host:port`), comma-separated, tried in turn.
    #[arg(
        long,
        env = "VIGIL_CONTROL_PLANE",
        value_delimiter = ',',
        required = true
    )]
    pub control_plane: Vec<String>,
    /// The join token that admits this proxy to the stream.
    #[arg(long, env = "VIGIL_JOIN_TOKEN", hide_env_values = true)]
    #[serde(serialize_with = "config::redact")]
    pub join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long, env = "VIGIL_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// CA certificate (PEM file) of the control plane's gRPC certificate.
    #[arg(long, env = "VIGIL_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// Base64 public keys that may sign snapshots, comma-separated.
    #[arg(long, env = "VIGIL_SNAPSHOT_KEYS", value_delimiter = ',')]
    pub snapshot_keys: Vec<String>,
    /// A file of the keys that may sign snapshots: base64 public keys, or PEM
    /// `PUBLIC KEY` / `CERTIFICATE` blocks carrying Ed25519 keys.
    #[arg(long, env = "VIGIL_SNAPSHOT_KEYS_FILE")]
    pub snapshot_keys_file: Option<PathBuf>,
    /// This proxy's id in the fleet (default: the host name).
    #[arg(long, env = "VIGIL_PROXY_ID")]
    pub proxy_id: Option<String>,
    /// Where the last good snapshot is kept, to enforce across restarts while the
    /// control plane is away.
    #[arg(long, env = "VIGIL_SNAPSHOT_FILE")]
    pub snapshot_file: Option<PathBuf>,
    /// Session cookie keys, `id:base64` (32 bytes), comma-separated, the sealing key first.
    #[arg(
        long,
        env = "VIGIL_COOKIE_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(serialize_with = "config::redact_all")]
    pub cookie_keys: Vec<String>,
    /// A file holding the cookie keys (`id:base64`, comma- or line-separated).
    #[arg(long, env = "VIGIL_COOKIE_KEYS_FILE")]
    pub cookie_keys_file: Option<PathBuf>,
    /// Peers (CIDRs) whose X-Forwarded-* headers are believed; none by default.
    #[arg(long, env = "VIGIL_TRUSTED_PROXIES", value_delimiter = ',')]
    #[serde(serialize_with = "config::display_all")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The authenticate host's public URL (`https://auth.example.com`), served by
    /// every proxy of the fleet; register `<it>/.vigil/callback` at each identity
    /// provider. Without it, browsers are not signed in (they get 401). Needs
    /// cookie keys.
    #[arg(long, env = "VIGIL_AUTHENTICATE_URL")]
    pub authenticate_url: Option<String>,
    /// The ports, besides the authenticate URL's, on which browsers reach route
    /// hosts (comma-separated). A sign-in returns only to a URL on one of them:
    /// the handoff code must not go to another service on a route host's name.
    #[arg(long, env = "VIGIL_RETURN_PORTS", value_delimiter = ',')]
    pub return_ports: Vec<u16>,
    /// The fleet's key for `X-Vigil-Jwt-Assertion` (P-256 PEM file, PKCS#8 or
    /// SEC1); every proxy must have the same. Without it each proxy makes its own
    /// at start (development only: upstreams then cannot verify across proxies).
    #[arg(long, env = "VIGIL_ASSERTION_KEY_FILE")]
    pub assertion_key_file: Option<PathBuf>,
    /// How long a session lasts after sign-in, in seconds (default 12 hours).
    #[arg(long, env = "VIGIL_SESSION_LIFETIME_S", default_value_t = 43_200)]
    pub session_lifetime_s: u64,
    /// Seconds an HTTP/1 client has to send a request's headers, counted from
    /// the moment its connection is ready for the request (just opened, or idle
    /// after the previous response); then the connection is closed. Holds off
    /// clients that trickle headers to tie up connections, and closes idle
    /// keep-alive connections; an HTTP/2 connection with no stream open for as
    /// long is closed too.
    #[arg(long, env = "VIGIL_PROXY_HEADER_TIMEOUT_S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_s: u64,
    /// Client connections served at once, on the proxy's listener and apart on
    /// the redirect listener; one more is closed as soon as it is accepted, so
    /// that the client or its load balancer can retry elsewhere. Default: half
    /// the process's open-file limit (which the proxy raises to its hard limit at
    /// start), leaving the rest to upstream connections.
    #[arg(long, env = "VIGIL_PROXY_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// For tests only: a file holding an offset in seconds that moves the proxy's
    /// clock for every policy, session, grant and token time check (re-read every
    /// 100 ms). Hidden from --help.
    #[arg(long, env = "VIGIL_TEST_CLOCK_FILE", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_clock_file: Option<PathBuf>,
}

#[derive(Args, Serialize, Clone)]
pub(crate) struct DatabaseArgs {
    /// `postgres://...` or `sqlite://path?mode=rwc`.
    #[arg(long, env = "VIGIL_DATABASE_URL", hide_env_values = true)]
    #[serde(serialize_with = "config::redact_url")]
    pub database_url: Option<String>,
    /// A file holding the database URL.
    #[arg(long, env = "VIGIL_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
}

impl DatabaseArgs {
    fn url(&self) -> anyhow::Result<String> {
        config::secret(
            "VIGIL_DATABASE_URL",
            &self.database_url,
            &self.database_url_file,
        )?
        .context("set the database: --database-url, VIGIL_DATABASE_URL or VIGIL_DATABASE_URL_FILE")
    }
}

#[derive(Args, Serialize, Clone)]
pub(crate) struct ControlArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub db: DatabaseArgs,
    /// Address of the admin API (and `/healthz`, `/readyz`).
    #[arg(long, env = "VIGIL_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    pub admin_listen: SocketAddr,
    /// Apply pending migrations before serving (else refuse to start on a schema that is behind).
    #[arg(long, env = "VIGIL_MIGRATE")]
    pub migrate: bool,
    /// An owner token accepted for the first start (create stored admin tokens with it).
    #[arg(long, env = "VIGIL_BOOTSTRAP_TOKEN", hide_env_values = true)]
    #[serde(serialize_with = "config::redact")]
    pub bootstrap_token: Option<String>,
    /// A file holding the bootstrap token.
    #[arg(long, env = "VIGIL_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Base64 32-byte key that encrypts secrets at rest (e.g. IdP client secrets).
    #[arg(long, env = "VIGIL_SECRET_KEY", hide_env_values = true)]
    #[serde(serialize_with = "config::redact")]
    pub secret_key: Option<String>,
    /// A file holding the secret-at-rest key.
    #[arg(long, env = "VIGIL_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Address of the gRPC snapshot stream proxies subscribe to.
    #[arg(long, env = "VIGIL_GRPC_LISTEN", default_value = "127.0.0.1:8443")]
    pub grpc_listen: SocketAddr,
    /// Certificate chain (PEM) for the gRPC listener; without it the stream is plain HTTP/2.
    #[arg(long, env = "VIGIL_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// Private key (PEM) for the gRPC listener.
    #[arg(long, env = "VIGIL_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// The key that signs snapshots (the same on every replica): a base64 32-byte
    /// Ed25519 seed or a PKCS#8 PEM. Without it a key is generated for this run
    /// and its public key logged.
    #[arg(long, env = "VIGIL_SIGNING_KEY", hide_env_values = true)]
    #[serde(serialize_with = "config::redact")]
    pub signing_key: Option<String>,
    /// A file holding the signing key.
    #[arg(long, env = "VIGIL_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// A join token (at least 32 characters) admitting proxies besides those
    /// created through the API: for fleets configured from a shared secret.
    #[arg(long, env = "VIGIL_FLEET_JOIN_TOKEN", hide_env_values = true)]
    #[serde(serialize_with = "config::redact")]
    pub fleet_join_token: Option<String>,
    /// A file holding the fleet join token.
    #[arg(long, env = "VIGIL_FLEET_JOIN_TOKEN_FILE")]
    pub fleet_join_token_file: Option<PathBuf>,
    /// Database connections in the pool (default: four per core, 4 to 32).
    #[arg(long, env = "VIGIL_DATABASE_MAX_CONNECTIONS")]
    pub database_max_connections: Option<u32>,
    /// Admin API connections served at once (default 1024); one more is closed as
    /// soon as it is accepted. Idle connections close after 10 s by themselves.
    #[arg(long, env = "VIGIL_ADMIN_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_max_connections: Option<u64>,
    /// Seconds between re-verifications of each browser session with its identity
    /// provider (refresh token, userinfo); 0 disables them.
    #[arg(long, env = "VIGIL_REVERIFY_INTERVAL_S", default_value_t = 300)]
    pub reverify_interval_s: u64,
    /// Re-verifications started per second at most, per identity provider.
    #[arg(long, env = "VIGIL_REVERIFY_RATE", default_value_t = vigil_control::verifier::PER_PROVIDER_PER_SECOND,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub reverify_rate: u32,
    /// Re-verifications in flight at once, per identity provider.
    #[arg(long, env = "VIGIL_REVERIFY_CONCURRENCY", default_value_t = vigil_control::verifier::IN_FLIGHT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub reverify_concurrency: u32,
    /// Seconds a session may go unused anywhere in the fleet before it is revoked
    /// (default 8 hours; at least 300, since proxies report use once a minute);
    /// 0 disables it.
    #[arg(long, env = "VIGIL_SESSION_IDLE_TIMEOUT_S", default_value_t = 28_800)]
    pub session_idle_timeout_s: u64,
}

/// Lines waiting for the log thread; past this, logging waits for it (as a direct
/// write would wait for a slow stdout).
const LOG_QUEUE: usize = 16 * 1024;

/// Hands each event's line to the log thread, borrowing the one sender (no
/// reference count shared by every worker thread to bump per line).
struct LogLines(std::sync::mpsc::SyncSender<Vec<u8>>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(&self.0)
    }
}

/// One log line on its way to the log thread (tracing-subscriber writes each event
/// with a single `write_all`).
struct LogLine<'a>(&'a std::sync::mpsc::SyncSender<Vec<u8>>);

impl std::io::Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // An empty line is the flush marker; there is nothing to send for it anyway.
        if !buf.is_empty() {
            self.0
                .send(buf.to_vec())
                .map_err(|_| std::io::Error::other("the log thread is gone"))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits, when dropped at the end of `main`, until every line logged before is
/// written.
struct LogFlush {
    lines: std::sync::mpsc::SyncSender<Vec<u8>>,
    written: std::sync::mpsc::Receiver<()>,
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        if self.lines.send(Vec::new()).is_ok() {
            let _ = self.written.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Logs to stdout through a thread of its own, so that a request (one decision line
/// each) never waits for a write: the thread writes what has gathered since its last
/// write in one `write`, at once when it was idle, else within a millisecond.
fn init_tracing(format: LogFormat) -> LogFlush {
    use std::io::Write as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG").unwrap_or_else(|_| "info".into());
    let (lines, queued) = std::sync::mpsc::sync_channel::<Vec<u8>>(LOG_QUEUE);
    let (flushed, written) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("vigil-log".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(64 * 1024);
            while let Ok(first) = queued.recv() {
                let mut flush_asked = first.is_empty();
                batch.extend_from_slice(&first);
                while batch.len() < 64 * 1024 {
                    match queued.try_recv() {
                        Ok(line) if line.is_empty() => flush_asked = true,
                        Ok(line) => batch.extend_from_slice(&line),
                        Err(_) => break,
                    }
                }
                let mut out = std::io::stdout().lock();
                // Nowhere to report a failing stdout; the lines are dropped.
                let _ = out.write_all(&batch).and_then(|()| out.flush());
                batch.clear();
                if flush_asked {
                    let _ = flushed.send(());
                } else {
                    // Under load, lines gather meanwhile and their senders need not
                    // wake this thread: at most a thousand writes a second.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // No thread: write directly.
    let writer = spawned.ok().map(|_| LogLines(lines.clone()));
    match format {
        LogFormat::Text => {
            let text = builder
                .with_target(false)
                // Colour only for a terminal: log files and collectors get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
            match writer {
                Some(w) => text.with_writer(w).init(),
                None => text.init(),
            }
        }
        LogFormat::Json => {
            // The target stays: `vigil::decision` marks the decision log.
            let json = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            match writer {
                Some(w) => json.with_writer(w).init(),
                None => json.init(),
            }
        }
    }
    LogFlush { lines, written }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("Shutting down");
}

async fn open_store(url: &str, max_connections: Option<u32>) -> anyhow::Result<Store> {
    let defaults = StoreOptions::default();
    let opts = StoreOptions {
        max_connections: max_connections.unwrap_or(defaults.max_connections),
        ..defaults
    };
    Store::connect(url, opts)
        .await
        .context("opening the database")
}

async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let store = open_store(&args.url()?, Some(2)).await?;
    store.migrate().await.context("applying migrations")?;
    let status = store.schema_status().await?;
    println!("schema at version {:?}", status.applied.last());
    Ok(())
}

/// Runs the control plane until SIGTERM or Ctrl-C. `started` receives the
/// control plane once its listeners are bound (the all-in-one seeds through it).
async fn control(
    args: ControlArgs,
    started: Option<tokio::sync::oneshot::Sender<Control>>,
) -> anyhow::Result<()> {
    let bootstrap_token = config::secret(
        "VIGIL_BOOTSTRAP_TOKEN",
        &args.bootstrap_token,
        &args.bootstrap_token_file,
    )?;
    let secret_key = config::secret("VIGIL_SECRET_KEY", &args.secret_key, &args.secret_key_file)?;
    let signing_key = config::secret(
        "VIGIL_SIGNING_KEY",
        &args.signing_key,
        &args.signing_key_file,
    )?;
    let fleet_join_token = config::secret(
        "VIGIL_FLEET_JOIN_TOKEN",
        &args.fleet_join_token,
        &args.fleet_join_token_file,
    )?;
    let store = open_store(&args.db.url()?, args.database_max_connections).await?;
    // Wait for the database at start rather than failing on a transient outage.
    let mut delay = Duration::from_millis(200);
    loop {
        match store.ping().await {
            Ok(()) => break,
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "Database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("checking the database"),
        }
    }
    if args.migrate {
        store.migrate().await.context("applying migrations")?;
    }
    let status = store
        .schema_status()
        .await
        .context("reading the schema version")?;
    let pending = status.pending();
    if !pending.is_empty() {
        bail!("the database schema is behind (pending migrations {pending:?}); run `vigil migrate` or start with --migrate");
    }
    if bootstrap_token.is_none() {
        tracing::warn!("No bootstrap token configured: only stored admin tokens can use the API");
    }
    let config = ControlConfig {
        bootstrap_token,
        secret_key: secret_key.map(|k| ("k1".to_owned(), k)),
    };
    let control = Control::new(store.clone(), config).context("VIGIL_SECRET_KEY")?;
    if let Some(token) = &fleet_join_token {
        control
            .accept_fleet_join_token(token)
            .map_err(|e| anyhow::anyhow!("VIGIL_FLEET_JOIN_TOKEN: {e}"))?;
    }
    let signer = match &signing_key {
        Some(key) => vigil_snapshot::Signer::from_text(key).context("VIGIL_SIGNING_KEY")?,
        None => {
            let (signer, _) = vigil_snapshot::Signer::generate()?;
            tracing::warn!(
                public_key = %signer.public_key_base64(),
                "No signing key configured (VIGIL_SIGNING_KEY): snapshots are signed with a key made for this run only"
            );
            signer
        }
    };
    tracing::info!(key_id = signer.key_id(), public_key = %signer.public_key_base64(), "Signing snapshots");
    let hub = control
        .start_snapshots(signer)
        .await
        .context("building the first snapshot")?;
    control.start_verifier(
        Duration::from_secs(args.reverify_interval_s),
        vigil_control::verifier::Limits {
            per_second: args.reverify_rate,
            in_flight: args.reverify_concurrency,
        },
    );
    control.start_idle_timeout(Duration::from_secs(args.session_idle_timeout_s));
    let mut grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let (Some(cert), Some(key)) = (&args.grpc_tls_cert, &args.grpc_tls_key) {
        let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        grpc = grpc
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .context("gRPC TLS")?;
    } else {
        tracing::warn!("The gRPC stream is not encrypted: set VIGIL_GRPC_TLS_CERT and VIGIL_GRPC_TLS_KEY outside tests");
    }
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC stream to {}", args.grpc_listen))?;
    tracing::info!(addr = %grpc_listener.local_addr()?, "Snapshot stream listening");
    let grpc_server = grpc
        .add_service(vigil_control::stream::Service::server(control.clone(), hub))
        .serve_with_incoming_shutdown(
            vigil_control::serve::screened(grpc_listener),
            shutdown_signal(),
        );
    let grpc_task = tokio::spawn(grpc_server);
    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin API to {}", args.admin_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "Admin API listening");
    if let Some(tx) = started {
        let _ = tx.send(control.clone());
    }
    let max_connections = args
        .admin_max_connections
        .map_or(vigil_control::serve::MAX_CONNECTIONS, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
    vigil_control::serve::serve(
        listener,
        vigil_control::router(control),
        max_connections,
        shutdown_signal(),
    )
    .await;
    grpc_task.abort();
    store.close().await;
    Ok(())
}

/// Runs a proxy until SIGTERM or Ctrl-C. `started` receives the subscriber's
/// handle once the listeners are bound.
async fn proxy(
    args: ProxyArgs,
    started: Option<tokio::sync::oneshot::Sender<vigil_proxy::subscriber::Handle>>,
) -> anyhow::Result<()> {
    use vigil_proxy::{serve, subscriber};
    let clock_task = args
        .test_clock_file
        .clone()
        .map(vigil_proxy::clock::follow_file);
    let join_token = config::secret("VIGIL_JOIN_TOKEN", &args.join_token, &args.join_token_file)?
        .context(
        "set the join token: --join-token, VIGIL_JOIN_TOKEN or VIGIL_JOIN_TOKEN_FILE",
    )?;
    let verifier = match (&args.snapshot_keys_file, args.snapshot_keys.is_empty()) {
        (Some(_), false) => bail!("set VIGIL_SNAPSHOT_KEYS or VIGIL_SNAPSHOT_KEYS_FILE, not both"),
        (Some(path), true) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("VIGIL_SNAPSHOT_KEYS_FILE: reading {}", path.display())
            })?;
            vigil_snapshot::Verifier::from_text(&text).context("VIGIL_SNAPSHOT_KEYS_FILE")?
        }
        (None, false) => {
            vigil_snapshot::Verifier::from_base64(args.snapshot_keys.iter().map(String::as_str))
                .context("VIGIL_SNAPSHOT_KEYS")?
        }
        (None, true) => bail!(
            "set the keys that may sign snapshots: --snapshot-keys, VIGIL_SNAPSHOT_KEYS or VIGIL_SNAPSHOT_KEYS_FILE"
        ),
    };
    let mut cookie_key_list = args.cookie_keys.clone();
    if let Some(text) = config::secret("VIGIL_COOKIE_KEYS", &None, &args.cookie_keys_file)? {
        if !cookie_key_list.is_empty() {
            bail!("set VIGIL_COOKIE_KEYS or VIGIL_COOKIE_KEYS_FILE, not both");
        }
        cookie_key_list = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
    }
    if args.authenticate_url.is_some() && cookie_key_list.is_empty() {
        bail!("VIGIL_AUTHENTICATE_URL needs cookie keys (VIGIL_COOKIE_KEYS or VIGIL_COOKIE_KEYS_FILE)");
    }
    let ca_pem = match &args.control_plane_ca {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let cookie_keys = if cookie_key_list.is_empty() {
        None
    } else {
        let mut keys = Vec::new();
        for k in &cookie_key_list {
            let (id, key) = k
                .split_once(':')
                .context("VIGIL_COOKIE_KEYS: each key is `id:base64`")?;
            let id: u8 = id
                .parse()
                .context("VIGIL_COOKIE_KEYS: a key id is a number from 0 to 255")?;
            keys.push((id, key));
        }
        Some(std::sync::Arc::new(
            vigil_proxy::cookie::CookieKeys::new(keys)
                .map_err(|_| anyhow::anyhow!("VIGIL_COOKIE_KEYS: each key is 32 bytes, base64"))?,
        ))
    };
    let proxy_id = args.proxy_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "proxy".into())
    });
    let handle = subscriber::start(subscriber::Config {
        addresses: args.control_plane.clone(),
        join_token,
        ca_pem,
        verifier,
        proxy_id,
        labels: Vec::new(),
        snapshot_file: args.snapshot_file.clone(),
    });
    let metrics = vigil_proxy::metrics::Metrics::new();
    // When the snapshot last changed, for its age.
    let changed_at = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let mut version = handle.version.clone();
        let changed_at = changed_at.clone();
        tokio::spawn(async move {
            loop {
                if *version.borrow_and_update() > 0 {
                    changed_at.store(unix_ms(), std::sync::atomic::Ordering::Relaxed);
                }
                if version.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let health = {
        let handle = handle.clone();
        let (scrape_handle, metrics) = (handle.clone(), metrics.clone());
        axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let (handle, metrics) = (scrape_handle.clone(), metrics.clone());
                    let changed = changed_at.load(std::sync::atomic::Ordering::Relaxed);
                    async move {
                        let version = *handle.version.borrow();
                        metrics
                            .snapshot_version
                            .set(i64::try_from(version).unwrap_or(i64::MAX));
                        let age = if changed == 0 {
                            0.0
                        } else {
                            unix_ms().saturating_sub(changed) as f64 / 1000.0
                        };
                        metrics.snapshot_age.set(age);
                        let up = matches!(
                            *handle.link.borrow(),
                            vigil_proxy::subscriber::Link::Connected { .. }
                        );
                        metrics.stream_connected.set(i64::from(up));
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics.render(),
                        )
                    }
                }),
            )
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let handle = handle.clone();
                    async move {
                        match handle.readiness() {
                            Ok(m) => (axum::http::StatusCode::OK, format!("{m}\n")),
                            Err(m) => (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                format!("{m}\n"),
                            ),
                        }
                    }
                }),
            )
    };
    let health_listener = tokio::net::TcpListener::bind(args.health_listen)
        .await
        .with_context(|| format!("binding the health endpoints to {}", args.health_listen))?;
    tracing::info!(addr = %health_listener.local_addr()?, "Health endpoints listening");
    let health_task = tokio::spawn(async move { axum::serve(health_listener, health).await });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the proxy to {}", args.listen))?;
    let tls = match &args.tls_dir {
        Some(dir) => {
            let store = vigil_proxy::tls::CertStore::open(dir)
                .map_err(|e| anyhow::anyhow!("VIGIL_PROXY_TLS_DIR: {e}"))?;
            store.watch(Duration::from_secs(5));
            let client_cas = match &args.client_ca_file {
                Some(path) => {
                    let cas = vigil_proxy::tls::ClientCas::open(path)
                        .map_err(|e| anyhow::anyhow!("VIGIL_CLIENT_CA_FILE: {e}"))?;
                    cas.watch(Duration::from_secs(5));
                    tracing::info!(file = %path.display(), "Client certificates accepted");
                    Some(cas)
                }
                None => None,
            };
            let config = vigil_proxy::tls::server_config(store, client_cas)
                .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, dir = %dir.display(), "Proxy listening (HTTPS)");
            Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
        }
        None => {
            tracing::warn!(addr = %listener.local_addr()?, "Proxy listening on plain HTTP: set VIGIL_PROXY_TLS_DIR outside development");
            None
        }
    };
    let max_connections = connection_limit(args.max_connections);
    tracing::info!(max_connections, "Connection limit");
    let redirect_task = match args.redirect_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the redirect listener to {addr}"))?;
            let https_port = args.redirect_https_port.unwrap_or(args.listen.port());
            Some(tokio::spawn(serve::serve_redirect(
                l,
                https_port,
                Duration::from_secs(args.header_timeout_s),
                max_connections,
                shutdown_signal(),
            )))
        }
        None => None,
    };
    let login = match (&args.authenticate_url, &cookie_keys) {
        (Some(url), Some(keys)) => {
            let login = vigil_proxy::login::Login::new(
                vigil_proxy::login::LoginConfig {
                    authenticate_url: url.clone(),
                    return_ports: args.return_ports.clone(),
                    session_lifetime: Duration::from_secs(args.session_lifetime_s.max(60)),
                },
                keys.clone(),
                handle.reports.clone(),
            )
            .map_err(|e| anyhow::anyhow!("VIGIL_AUTHENTICATE_URL: {e}"))?;
            tracing::info!(url = %url, "Browser sign-in through the authenticate host");
            Some(std::sync::Arc::new(login))
        }
        _ => None,
    };
    let issuer = args.authenticate_url.as_deref().unwrap_or("vigil");
    let assertions = match &args.assertion_key_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("VIGIL_ASSERTION_KEY_FILE: reading {}", path.display()))?;
            vigil_proxy::assertion::Assertions::from_pem(&pem, issuer)
                .map_err(|e| anyhow::anyhow!("VIGIL_ASSERTION_KEY_FILE: {e}"))?
        }
        None => {
            tracing::warn!("No VIGIL_ASSERTION_KEY_FILE: signing identity assertions with a key made for this process only");
            vigil_proxy::assertion::Assertions::generate(issuer).map_err(|e| anyhow::anyhow!(e))?
        }
    };
    let proxy = serve::Proxy::new(
        handle.index.clone(),
        serve::ServeConfig {
            assertions: Some(std::sync::Arc::new(assertions)),
            metrics: Some(metrics),
            trusted_proxies: vigil_proxy::edge::TrustedProxies(args.trusted_proxies.clone()),
            cookie_keys,
            tls: tls.is_some(),
            login,
            header_read_timeout: Duration::from_secs(args.header_timeout_s),
            max_connections,
        },
    );
    // Open tunnels are checked again as soon as a new snapshot is in.
    proxy.tunnels().follow(handle.version.clone());
    proxy.streams().follow(handle.version.clone());
    if let Some(tx) = started {
        let _ = tx.send(handle.clone());
    }
    serve::serve(listener, proxy, tls, shutdown_signal()).await;
    health_task.abort();
    if let Some(t) = redirect_task {
        t.abort();
    }
    if let Some(t) = clock_task {
        t.abort();
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one (as Go does for every
/// program, and nginx with `worker_rlimit_nofile`). Every connection holds a file
/// descriptor, and Debian's default soft limit of 1,024 would cap the proxy far
/// below what it can serve.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?raised.current, "Open-file limit raised")
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = ?limit.current, "Could not raise the open-file limit")
        }
    }
}

/// Client connections served at once: `configured`, else half the open-file limit
/// (the other half for upstream connections, the snapshot stream and files), else
/// (no limit known) 65,536. Warns when the limit leaves little room.
fn connection_limit(configured: Option<u64>) -> usize {
    // Raised already, in `main`.
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let max = configured.unwrap_or_else(|| files.map_or(65_536, |f| (f / 2).max(1)));
    if let Some(f) = files.filter(|f| max.saturating_mul(2) > *f) {
        tracing::warn!(
            max_connections = max,
            open_file_limit = f,
            "The connection limit leaves fewer than one file descriptor per connection for its upstream: raise the open-file limit (ulimit -n) or lower VIGIL_PROXY_MAX_CONNECTIONS"
        );
    }
    usize::try_from(max).unwrap_or(usize::MAX)
}

/// Now, in Unix milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn main() -> anyhow::Result<()> {
    let cli: Cli = config::parse()?;
    if cli.print_config {
        // The global settings are printed in the section, where the file may set them.
        let globals = [("log_format", cli.log_format.name())];
        let text = match &cli.command {
            Command::Control(a) => config::print("control", a, &globals)?,
            Command::Proxy(a) => config::print("proxy", a, &globals)?,
            Command::AllInOne(a) => config::print("all-in-one", a, &globals)?,
            Command::Migrate(a) => config::print("migrate", a, &globals)?,
            Command::Keys(_) | Command::Version => {
                bail!("--print-config applies to control, proxy, all-in-one and migrate")
            }
        };
        print!("{text}");
        return Ok(());
    }
    match cli.command {
        Command::Version => {
            println!("vigil {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Keys(KeysCommand::Generate(args)) => return keys::generate(&args),
        _ => {}
    }
    // Dropped last: every line is written before the process ends.
    let _log = init_tracing(cli.log_format);
    // Connections (the proxy's clients, the control plane's streams) are files.
    raise_open_files_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Control(args) => control(args, None).await,
            Command::Proxy(args) => proxy(args, None).await,
            Command::AllInOne(args) => allinone::run(args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Keys(_) | Command::Version => Ok(()),
        }
    })
}

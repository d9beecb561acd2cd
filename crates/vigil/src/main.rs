//! `vigil`: the control plane (and, later, the proxy and the all-in-one) in one binary.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use vigil_control::{Control, ControlConfig};
use vigil_store::{Store, StoreOptions};

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Zero-trust access: control plane and identity-aware proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: the admin REST API over the store.
    Control(ControlArgs),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(Args)]
struct DatabaseArgs {
    /// `postgres://...` or `sqlite://path?mode=rwc`.
    #[arg(long, env = "VIGIL_DATABASE_URL")]
    database_url: String,
}

#[derive(Args)]
struct ControlArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address of the admin API.
    #[arg(long, env = "VIGIL_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    admin_listen: SocketAddr,
    /// Apply pending migrations before serving (else refuse to start on a schema that is behind).
    #[arg(long, env = "VIGIL_MIGRATE")]
    migrate: bool,
    /// An owner token accepted for the first start (create stored admin tokens with it).
    #[arg(long, env = "VIGIL_BOOTSTRAP_TOKEN", hide_env_values = true)]
    bootstrap_token: Option<String>,
    /// Base64 32-byte key that encrypts secrets at rest (e.g. IdP client secrets).
    #[arg(long, env = "VIGIL_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Address of the gRPC snapshot stream proxies subscribe to.
    #[arg(long, env = "VIGIL_GRPC_LISTEN", default_value = "127.0.0.1:8443")]
    grpc_listen: SocketAddr,
    /// Certificate chain (PEM) for the gRPC listener; without it the stream is plain HTTP/2.
    #[arg(long, env = "VIGIL_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    grpc_tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for the gRPC listener.
    #[arg(long, env = "VIGIL_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    grpc_tls_key: Option<std::path::PathBuf>,
    /// Base64 32-byte Ed25519 seed that signs snapshots (the same on every replica).
    /// Without it a key is generated for this run and its public key logged.
    #[arg(long, env = "VIGIL_SIGNING_KEY", hide_env_values = true)]
    signing_key: Option<String>,
    /// Database connections in the pool (default: four per core, 4 to 32).
    #[arg(long, env = "VIGIL_DATABASE_MAX_CONNECTIONS")]
    database_max_connections: Option<u32>,
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
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
    let store = open_store(&args.database_url, Some(2)).await?;
    store.migrate().await.context("applying migrations")?;
    let status = store.schema_status().await?;
    println!("schema at version {:?}", status.applied.last());
    Ok(())
}

async fn control(args: ControlArgs) -> anyhow::Result<()> {
    let store = open_store(&args.db.database_url, args.database_max_connections).await?;
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
    if args.bootstrap_token.is_none() {
        tracing::warn!("No bootstrap token configured: only stored admin tokens can use the API");
    }
    let config = ControlConfig {
        bootstrap_token: args.bootstrap_token,
        secret_key: args.secret_key.map(|k| ("k1".to_owned(), k)),
    };
    let control = Control::new(store.clone(), config).context("VIGIL_SECRET_KEY")?;
    let signer = match &args.signing_key {
        Some(seed) => {
            vigil_snapshot::Signer::from_seed_base64(seed).context("VIGIL_SIGNING_KEY")?
        }
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
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            shutdown_signal(),
        );
    let grpc_task = tokio::spawn(grpc_server);
    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin API to {}", args.admin_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "Admin API listening");
    axum::serve(listener, vigil_control::router(control))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the admin API")?;
    grpc_task.abort();
    store.close().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Control(args) => control(args).await,
            Command::Migrate(args) => migrate(args).await,
        }
    })
}

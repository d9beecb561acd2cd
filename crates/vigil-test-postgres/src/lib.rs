//! Throwaway PostgreSQL clusters for tests: `initdb` into a temporary directory,
//! start on a free loopback port, and clean up even if the test process dies.
//! With `DATABASE_URL` set, tests use that server instead (see [`database_url`]).

use std::io;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// A running cluster owned by this process; stopped and removed on drop.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_root: bool,
    durable: bool,
}

/// Finds the server binaries (`/usr/lib/postgresql/<version>/bin`, newest first).
fn server_bin_dir() -> io::Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("/usr/lib/postgresql: {e} (run scripts/ensure-deps.sh)"),
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin",
        )
    })
}

/// Runs the rest of a command line as `postgres` (when we are root: the server refuses to).
const AS_POSTGRES: [&str; 4] = ["runuser", "-u", "postgres", "--"];

/// A free loopback port, never one this process has been given before: the port is
/// free when returned but bound later by whoever asked, and the kernel could hand
/// the same one to the next caller meanwhile.
pub fn free_port() -> io::Result<u16> {
    /// One bit per port given out by this process.
    static GIVEN: [AtomicU64; 1024] = [const { AtomicU64::new(0) }; 1024];
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (word, bit) = (usize::from(port / 64), 1u64 << (port % 64));
        if GIVEN[word].fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no loopback port left that this process has not used",
    ))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn unique_dir() -> io::Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "vigil-pg-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl TestPostgres {
    /// Creates and starts a fresh cluster (about a second), tuned for tests: no fsync.
    pub fn start() -> io::Result<TestPostgres> {
        Self::start_with(false)
    }

    /// Like [`TestPostgres::start`] but with PostgreSQL's durable defaults (fsync on),
    /// for benchmarks that must count the cost of flushing commits.
    pub fn start_durable() -> io::Result<TestPostgres> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> io::Result<TestPostgres> {
        let bin = server_bin_dir()?;
        let port = free_port()?;
        // From here on, dropping `pg` removes the directory.
        let pg = TestPostgres {
            dir: unique_dir()?,
            bin,
            port,
            as_root: is_root(),
            durable,
        };
        if pg.as_root {
            // initdb refuses to run as root: hand the directory to `postgres`.
            run(Command::new("chown").arg("postgres:").arg(&pg.dir))?;
        }
        let data = pg.data_dir();
        pg.run_pg(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        )?;
        pg.watchdog()?;
        pg.resume()?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run_pg(&self, tool: &str, args: &[&str]) -> io::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_root {
            let mut c = Command::new(AS_POSTGRES[0]);
            c.args(&AS_POSTGRES[1..]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args).current_dir(&self.dir);
        run(&mut cmd)
    }

    /// Stops the cluster when this process exits, however it exits.
    fn watchdog(&self) -> io::Result<()> {
        let stop = format!(
            "{} {}/pg_ctl -D {} -m immediate stop >/dev/null 2>&1",
            if self.as_root {
                AS_POSTGRES.join(" ")
            } else {
                String::new()
            },
            path_str(&self.bin)?,
            path_str(&self.data_dir())?
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop}; rm -rf {dir}",
            pid = std::process::id(),
            dir = path_str(&self.dir)?
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(())
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn resume(&self) -> io::Result<()> {
        let data = self.data_dir();
        let fast = if self.durable {
            ""
        } else {
            " -c fsync=off -c full_page_writes=off"
        };
        let opts = format!(
            "-k {} -h 127.0.0.1 -p {}{fast} -c max_connections=200",
            path_str(&self.dir)?,
            self.port
        );
        let log = self.dir.join("server.log");
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "30",
                "-o",
                &opts,
                "start",
            ],
        )
    }

    /// Stops the server at once (as a crash would), keeping the data.
    pub fn halt(&self) -> io::Result<()> {
        let data = self.data_dir();
        self.run_pg(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "immediate", "-w", "stop"],
        )
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for one database of this cluster.
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> io::Result<String> {
        let port = self.port.to_string();
        self.run_pg(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name],
        )?;
        Ok(self.url(name))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self.halt();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("non-UTF-8 path {p:?}")))
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// The URL of a new, empty SQLite database file for one test (created on first
/// connection), in a directory of this process under the system's temporary one.
pub fn sqlite_url() -> io::Result<String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("vigil-sqlite-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("db{}.sqlite", N.fetch_add(1, Ordering::Relaxed)));
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(format!("sqlite://{}?mode=rwc", path_str(&path)?))
}

/// A fresh, empty database for one test: in this process's shared throwaway
/// cluster, or — when `DATABASE_URL` is set — on that server (the URL's user
/// must be allowed to create databases).
pub fn database_url() -> io::Result<String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "vigil_test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => create_on(&url, &name),
        _ => shared()?.create_database(&name),
    }
}

fn shared() -> io::Result<&'static TestPostgres> {
    static SHARED: OnceLock<Result<TestPostgres, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| TestPostgres::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

/// Creates `name` on the server of `url` with `psql` and returns the new database's URL.
fn create_on(url: &str, name: &str) -> io::Result<String> {
    run(Command::new("psql").arg(url).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        &format!("CREATE DATABASE {name}"),
    ]))?;
    let (base, _) = url
        .rsplit_once('/')
        .ok_or_else(|| io::Error::other("DATABASE_URL has no database part"))?;
    Ok(format!("{base}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_given_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let port = free_port().unwrap();
            assert!(seen.insert(port), "port {port} given twice");
        }
    }

    #[test]
    fn starts_halts_and_resumes() {
        let pg = TestPostgres::start().expect("cluster starts");
        let url = pg.create_database("probe").expect("createdb");
        assert!(url.ends_with("/probe"));
        let addr = format!("127.0.0.1:{}", pg.port());
        assert!(std::net::TcpStream::connect(&addr).is_ok());
        pg.halt().expect("halt");
        assert!(std::net::TcpStream::connect(&addr).is_err());
        pg.resume().expect("resume");
        assert!(std::net::TcpStream::connect(&addr).is_ok());
    }
}

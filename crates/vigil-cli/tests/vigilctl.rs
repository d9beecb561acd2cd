//! `vigilctl` against a real control plane served in this process on SQLite.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};
use vigil_control::{Control, ControlConfig};
use vigil_store::{Store, StoreOptions};

const TOKEN: &str = "vigilctl-e2e-bootstrap-token";

/// A control plane on a random loopback port, its database and vigilctl's
/// config directory in a fresh temporary directory.
struct Plane {
    url: String,
    dir: PathBuf,
    // Serves the API on its worker threads while the test runs vigilctl.
    _runtime: tokio::runtime::Runtime,
}

impl Plane {
    fn start() -> Plane {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vigilctl-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let db = format!("sqlite://{}/v.db?mode=rwc", dir.display());
        let url = runtime.block_on(async move {
            let store = Store::connect(&db, StoreOptions::default()).await.unwrap();
            store.migrate().await.unwrap();
            let config = ControlConfig {
                bootstrap_token: Some(TOKEN.into()),
                secret_key: None,
            };
            let control = Control::new(store, config).unwrap();
            // `GET /v1/proxies` needs the snapshot hub.
            let (signer, _) = vigil_snapshot::Signer::generate().unwrap();
            control.start_snapshots(signer).await.unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                axum::serve(listener, vigil_control::router(control))
                    .await
                    .unwrap();
            });
            format!("http://{addr}")
        });
        Plane {
            url,
            dir,
            _runtime: runtime,
        }
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// vigilctl with only its own configuration: none of the caller's environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigilctl"));
        cmd.args(args)
            .env("VIGIL_CONFIG_DIR", self.config_dir())
            .env_remove("VIGIL_ENDPOINT")
            .env_remove("VIGIL_TOKEN")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        Run::from(cmd.output().unwrap())
    }

    fn run_stdin(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        Run::from(child.wait_with_output().unwrap())
    }

    /// Runs and expects success.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "vigilctl {args:?} failed:\n{r:?}");
        r.stdout
    }

    /// Runs with `-o json` and expects success.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn write(&self, name: &str, value: &Value) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(value).unwrap()).unwrap();
        p
    }

    fn configure(&self) {
        self.ok(&["config", "set", "--endpoint", &self.url, "--token", TOKEN]);
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        let r = Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        };
        // Whatever happens, the admin token is never printed.
        assert!(
            !r.stdout.contains(TOKEN) && !r.stderr.contains(TOKEN),
            "the token was printed:\n{r:?}"
        );
        r
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn policy(name: &str) -> Value {
    json!({"name": name, "document": {"allow": {"and": [{"domain": "corp.example"}]}}})
}

/// The first column of a table's rows (the header left out).
fn first_column(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn config_is_stored_privately_and_shown_redacted() {
    let plane = Plane::start();
    plane.configure();
    let file = plane.config_dir().join("vigilctl.json");
    #[cfg(unix)]
    assert_eq!(mode(&file), 0o600);
    let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(stored["endpoint"], plane.url.as_str());

    let shown = plane.ok(&["config", "show"]);
    assert!(shown.contains(&plane.url), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    let shown = plane.json(&["config", "show"]);
    assert_eq!(shown["endpoint_source"], "file");
    assert_eq!(shown["token"], "<redacted>");

    // The token can come from standard input, off the command line.
    let r = plane.run_stdin(&["config", "set", "--token", "-"], &format!("{TOKEN}\n"));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(plane.ok(&["policies", "list"]).starts_with("NAME"));

    let r = plane.run(&["config", "set"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("nothing to set"), "{r:?}");
    let r = plane.run(&["config", "set", "--endpoint", "ftp://x"]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn resources_are_created_listed_read_updated_and_deleted() {
    let plane = Plane::start();
    plane.configure();

    // Create: from --data, from a file, from standard input; singular kind names too.
    let out = plane.ok(&["policies", "create", "--data", &policy("staff").to_string()]);
    assert!(out.starts_with("policy staff created (version "), "{out}");
    let route = json!({
        "name": "app", "host": "app.example.com",
        "upstreams": ["http://127.0.0.1:9"], "policies": ["staff"],
    });
    let route_file = plane.write("route.json", &route);
    plane.ok(&["route", "create", "-f", route_file.to_str().unwrap()]);
    let r = plane.run_stdin(
        &["group", "create", "-f", "-"],
        r#"{"kind": "group", "name": "eng"}"#,
    );
    assert_eq!(r.code, 0, "{r:?}");

    // List: a table by default, the API's page with -o json.
    let table = plane.ok(&["policies", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(first_column(&table), ["staff"]);
    let table = plane.ok(&["routes", "ls"]);
    assert_eq!(first_column(&table), ["app"]);
    assert!(
        table.contains("app.example.com") && table.contains("prefix /"),
        "{table}"
    );
    let page = plane.json(&["route", "list"]);
    assert_eq!(page["items"][0]["name"], "app");
    assert_eq!(page["next_cursor"], Value::Null);
    let filtered = plane.json(&["routes", "list", "--filter", "host=other.example.com"]);
    assert_eq!(filtered["items"], json!([]));

    // Get: JSON by default.
    let got: Value = serde_json::from_str(&plane.ok(&["policy", "get", "staff"])).unwrap();
    assert_eq!(got["name"], "staff");
    let v1 = got["version"].as_i64().unwrap();

    // Update: edit what `get` printed, keeping its version.
    let mut edited = got.clone();
    edited["description"] = json!("everyone at corp");
    let edited_file = plane.write("staff.json", &edited);
    let out = plane.ok(&[
        "policies",
        "update",
        "staff",
        "-f",
        edited_file.to_str().unwrap(),
    ]);
    assert!(out.starts_with("policy staff updated"), "{out}");
    let got = plane.json(&["policies", "get", "staff"]);
    assert_eq!(got["description"], "everyone at corp");
    assert!(got["version"].as_i64().unwrap() > v1);

    // The same edit again is based on a stale version: refused, nothing overwritten.
    let r = plane.run(&[
        "policies",
        "update",
        "staff",
        "-f",
        edited_file.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("error: Precondition Failed: "),
        "{r:?}"
    );

    // A merge patch needs a version too; --force overwrites deliberately.
    let patch = r#"{"description": "patched"}"#;
    let r = plane.run(&["policies", "update", "staff", "--merge", "--data", patch]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("--force"), "{r:?}");
    let current = got["version"].to_string();
    plane.ok(&[
        "policies",
        "update",
        "staff",
        "--merge",
        "--data",
        patch,
        "--if-match",
        &current,
    ]);
    assert_eq!(
        plane.json(&["policies", "get", "staff"])["description"],
        "patched"
    );
    plane.ok(&[
        "policies",
        "update",
        "staff",
        "--merge",
        "--force",
        "--data",
        r#"{"description": null}"#,
    ]);
    assert_eq!(
        plane.json(&["policies", "get", "staff"]).get("description"),
        None
    );

    // Delete: refused while a route refers to the policy, then in order.
    let r = plane.run(&["policies", "delete", "staff"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("error: Conflict: "), "{r:?}");
    assert!(r.stderr.contains("app"), "{r:?}");
    assert_eq!(
        plane.ok(&["routes", "delete", "app"]),
        "route app deleted\n"
    );
    plane.ok(&["policy", "rm", "staff"]);
    let r = plane.run(&["policies", "get", "staff"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("error: Not Found: "), "{r:?}");
    assert_eq!(
        first_column(&plane.ok(&["policies", "list"])),
        Vec::<String>::new()
    );
}

#[test]
fn tokens_issued_on_create_are_shown_once() {
    let plane = Plane::start();
    plane.configure();
    let out = plane.ok(&["join-token", "create", "--data", r#"{"name": "edge"}"#]);
    assert!(out.contains("\ntoken: vgl_join_"), "{out}");
    let listed = plane.json(&["join-tokens", "list"]);
    assert_eq!(listed["items"][0].get("token"), None);
    let rotated = plane.json(&["join-tokens", "rotate-token", "edge"]);
    assert!(rotated["token"].as_str().unwrap().starts_with("vgl_join_"));

    // A service account authenticated by its client certificate shows the
    // certificate's key fingerprint beside its name.
    let fingerprint = "ab".repeat(32);
    let data = format!(r#"{{"name": "robot", "client_certificate_sha256": "{fingerprint}"}}"#);
    let out = plane.ok(&["service-account", "create", "--data", &data]);
    assert!(out.contains("\ntoken: vgl_sa_"), "{out}");
    let table = plane.ok(&["service-accounts", "list"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("CERT SHA-256"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("robot"))
        .unwrap_or_default();
    assert!(row.contains(&fingerprint[..40]), "{table}");
}

#[test]
fn the_empty_fleet_is_a_table_and_json() {
    let plane = Plane::start();
    plane.configure();
    let table = plane.ok(&["fleet"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("VERSION") && table.contains("LAST SEEN"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 1, "{table}");
    let fleet = plane.json(&["proxies"]);
    assert_eq!(fleet["items"], json!([]));
    assert!(fleet["snapshot_version"].is_u64(), "{fleet}");
}

#[test]
fn invalid_documents_name_the_field() {
    let plane = Plane::start();
    plane.configure();
    // Malformed: an unknown field (400).
    let bad = r#"{"name": "bad", "host": "app.example.com", "upstreams": ["http://a"], "upstream_timeout": 3}"#;
    let r = plane.run(&["routes", "create", "--data", bad]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("error: Bad Request: "), "{r:?}");
    assert!(r.stderr.contains("upstream_timeout"), "{r:?}");
    // Invalid: every located error (422).
    let bad = r#"{"name": "bad", "host": "not a host", "upstreams": ["ftp://a"]}"#;
    let r = plane.run(&["routes", "create", "--data", bad]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("error: Unprocessable Entity: "),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("/host") && r.stderr.contains("/upstreams/0"),
        "{r:?}"
    );
    // A policy that does not compile, checked without storing it.
    let r = plane.run(&[
        "policy",
        "validate",
        "--data",
        r#"{"allow": {"and": [{"emial": "a@b"}]}}"#,
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("/document/allow/and/0/emial"), "{r:?}");
    assert_eq!(
        plane.ok(&["policy", "validate", "--data", &policy("p").to_string()]),
        "valid\n"
    );
    // Not JSON at all never reaches the server.
    let r = plane.run(&["routes", "create", "--data", "{"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("--data is not valid JSON"), "{r:?}");
}

#[test]
fn tokens_and_endpoints_follow_flag_env_file_precedence() {
    let plane = Plane::start();
    plane.configure();
    let wrong = "not-the-right-token-0123";

    let r = plane.run(&["--token", wrong, "policies", "list"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .starts_with("error: Unauthorized: unknown or revoked token"),
        "{r:?}"
    );
    assert!(r.stderr.contains("hint: check the token"), "{r:?}");
    assert!(
        !r.stderr.contains(wrong) && !r.stdout.contains(wrong),
        "{r:?}"
    );

    // The environment beats the file; a flag beats the environment.
    let r = plane.run_env(&["policies", "list"], &[("VIGIL_TOKEN", wrong)]);
    assert_eq!(r.code, 1, "{r:?}");
    let r = plane.run_env(
        &["policies", "list", "--token", TOKEN],
        &[("VIGIL_TOKEN", wrong)],
    );
    assert_eq!(r.code, 0, "{r:?}");

    // A dead endpoint is named.
    let dead = "http://127.0.0.1:9";
    let r = plane.run_env(&["policies", "list"], &[("VIGIL_ENDPOINT", dead)]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .starts_with(&format!("error: cannot reach the control plane at {dead}")),
        "{r:?}"
    );
    let r = plane.run_env(
        &["--endpoint", &plane.url, "policies", "list"],
        &[("VIGIL_ENDPOINT", dead)],
    );
    assert_eq!(r.code, 0, "{r:?}");

    // No token anywhere.
    std::fs::remove_file(plane.config_dir().join("vigilctl.json")).unwrap();
    let r = plane.run(&["--endpoint", &plane.url, "policies", "list"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("error: no token"), "{r:?}");
}

#[test]
fn usage_errors_exit_2() {
    let plane = Plane::start();
    for args in [
        &["widgets", "list"][..],
        &["policies", "create"],
        &["policies", "create", "-f", "a.json", "--data", "{}"],
        &["policies", "get"],
        &["groups", "rotate-token", "x"],
        &["policies", "list", "-o", "yaml"],
    ] {
        let r = plane.run(args);
        assert_eq!(r.code, 2, "vigilctl {args:?}: {r:?}");
    }
    assert_eq!(plane.run(&["--help"]).code, 0);
}

#[test]
fn apply_creates_then_updates_by_name() {
    let plane = Plane::start();
    plane.configure();
    // The route comes first in the file but refers to the policy and group.
    let docs = json!([
        {"kind": "route", "name": "app", "host": "app.example.com",
         "upstreams": ["http://127.0.0.1:9"], "policies": ["staff"]},
        {"kind": "policy", "name": "staff", "document": {"allow": {"and": [{"groups": {"any_of": ["eng"]}}]}}},
        {"kind": "groups", "name": "eng"},
        {"kind": "user", "issuer": "https://idp.example", "subject": "u1", "groups": ["eng"]},
    ]);
    let file = plane.write("all.json", &docs);
    let file = file.to_str().unwrap();
    let out = plane.ok(&["apply", "-f", file]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("group eng created"), "{out}");
    assert!(lines[1].starts_with("policy staff created"), "{out}");
    assert!(lines[2].starts_with("route app created"), "{out}");
    assert!(lines[3].starts_with("user usr_"), "{out}");

    // Again: found by name (and the user by issuer and subject), nothing created twice.
    let again = plane.json(&["apply", "-f", file]);
    let actions: Vec<&str> = again
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["unchanged", "unchanged", "updated", "updated"],
        "{again}"
    );
    assert_eq!(
        plane.json(&["users", "list"])["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A change is applied, with the version it was read at.
    let mut changed = docs.clone();
    changed[0]["host"] = json!("new.example.com");
    let file = plane.write("changed.json", &changed);
    plane.ok(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(
        plane.json(&["route", "get", "app"])["host"],
        "new.example.com"
    );

    // A failing document is named; what came before it stays applied.
    let bad = json!([{"kind": "group", "name": "ops"}, {"kind": "route", "name": "x", "host": "x.example.com", "upstreams": []}]);
    let file = plane.write("bad.json", &bad);
    let r = plane.run(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.starts_with("group ops created"), "{r:?}");
    assert!(
        r.stderr
            .starts_with("error: document 2 (route x): Unprocessable Entity: /upstreams"),
        "{r:?}"
    );
}

//! Configuration from flags, `VIGIL_*` environment variables and a YAML file,
//! in that order of precedence, and its printing with secrets redacted.
//!
//! The file has one section per subcommand, whose keys are the subcommand's
//! flag names (`admin_listen` or `admin-listen` for `--admin-listen`):
//!
//! ```yaml
//! control:
//!   admin_listen: 0.0.0.0:8080
//!   database_url_file: /run/secrets/database-url
//! proxy:
//!   control_plane: [https://control.internal:8443]
//! ```
//!
//! Only the running subcommand's section is read, so one file can serve both
//! planes. A key the subcommand does not have, or a value its flag would
//! refuse, stops the start with an error naming `section.key`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};
use serde_norway::Value;

/// Arguments that belong to the command line itself, never to the file.
const NOT_IN_FILE: &[&str] = &["config", "print_config", "help", "version"];

/// Parses the command line and fills in, from the file named by `--config` /
/// `VIGIL_CONFIG`, what neither a flag nor the environment gave. Exits with
/// clap's usage message on a bad command line.
pub fn parse<C: CommandFactory + FromArgMatches>() -> anyhow::Result<C> {
    parse_from::<C>(std::env::args_os().collect())
}

/// [`parse`] over the given arguments (the first is the program name).
pub fn parse_from<C: CommandFactory + FromArgMatches>(args: Vec<OsString>) -> anyhow::Result<C> {
    let cmd = C::command();
    // A first, lenient pass only to find the file and which values were given:
    // a required flag may well come from the file.
    let lenient = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(args.clone());
    let extra = match &lenient {
        Ok(m) => match m.get_one::<PathBuf>("config") {
            Some(path) => from_file(&cmd, m, path)?,
            None => Vec::new(),
        },
        Err(_) => Vec::new(),
    };
    let mut all = args;
    all.extend(extra);
    let matches = cmd.try_get_matches_from(all).unwrap_or_else(|e| e.exit());
    C::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The arguments the file adds to the running subcommand: `--key=value` for
/// each key whose flag was not given on the command line or in the environment.
fn from_file(cmd: &clap::Command, m: &ArgMatches, path: &Path) -> anyhow::Result<Vec<OsString>> {
    let Some((name, sub_m)) = m.subcommand() else {
        return Ok(Vec::new());
    };
    let Some(sub) = cmd.find_subcommand(name) else {
        return Ok(Vec::new());
    };
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration file {shown}"))?;
    let doc: Value =
        serde_norway::from_str(&text).with_context(|| format!("{shown} is not valid YAML"))?;
    let sections = match doc {
        Value::Mapping(m) => m,
        Value::Null => return Ok(Vec::new()),
        _ => bail!("{shown}: expected a mapping of sections (control, proxy, migrate, all-in-one)"),
    };
    let known_sections: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
    let mut section = None;
    for (key, value) in sections {
        let key = scalar_key(&key).with_context(|| format!("{shown}: a section name"))?;
        if !known_sections.contains(&key.as_str()) {
            bail!(
                "{shown}: unknown section `{key}`; the sections are {}",
                known_sections.join(", ")
            );
        }
        if key == name {
            section = Some(value);
        }
    }
    let entries = match section {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Mapping(m)) => m,
        Some(_) => bail!("{shown}: `{name}` must be a mapping of settings"),
    };
    let mut out = Vec::new();
    for (key, value) in entries {
        let key = scalar_key(&key).with_context(|| format!("{shown}: a key of `{name}`"))?;
        let id = key.replace('-', "_");
        let at = format!("{shown}: `{name}.{key}`");
        // The subcommand's own flags, and the global ones (`log_format`), which
        // any section may set.
        let settings = || {
            sub.get_arguments()
                .chain(cmd.get_arguments().filter(|a| a.is_global_set()))
                .filter(|a| a.get_long().is_some() && !NOT_IN_FILE.contains(&a.get_id().as_str()))
        };
        let arg = settings().find(|a| a.get_id().as_str() == id);
        let Some(arg) = arg else {
            let known: Vec<&str> = settings().map(|a| a.get_id().as_str()).collect();
            bail!(
                "{at} is not a setting of `{name}`; its settings are {}",
                known.join(", ")
            );
        };
        // A flag or the environment wins over the file.
        let given = |m: &ArgMatches| {
            matches!(
                m.value_source(&id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        if given(if arg.is_global_set() { m } else { sub_m }) {
            continue;
        }
        let long = arg.get_long().unwrap_or_default();
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                Value::Bool(true) => out.push(OsString::from(format!("--{long}"))),
                Value::Bool(false) | Value::Null => {}
                _ => bail!("{at}: expected true or false"),
            }
            continue;
        }
        let values = match value {
            Value::Null => continue,
            Value::Sequence(items) => items
                .iter()
                .map(|v| scalar(v).with_context(|| at.clone()))
                .collect::<anyhow::Result<Vec<_>>>()?,
            v => vec![scalar(&v).with_context(|| at.clone())?],
        };
        for v in values {
            // The flag's own parser, alone, so the error names this key.
            clap::Command::new("vigil")
                .arg(
                    clap::Arg::new("value")
                        .action(ArgAction::Set)
                        .allow_hyphen_values(true)
                        .value_parser(arg.get_value_parser().clone()),
                )
                .try_get_matches_from([OsString::from("vigil"), OsString::from(&v)])
                .map_err(|e| anyhow::anyhow!("{at}: {}", first_line(&e.to_string())))?;
            out.push(OsString::from(format!("--{long}={v}")));
        }
    }
    Ok(out)
}

fn scalar_key(v: &Value) -> anyhow::Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => bail!("keys must be strings"),
    }
}

fn scalar(v: &Value) -> anyhow::Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => bail!("expected a string, a number or a list of them"),
    })
}

fn first_line(s: &str) -> &str {
    let s = s.trim_start_matches("error: ");
    s.lines().next().unwrap_or(s).trim()
}

/// A secret given either directly or as a file holding it (for mounted
/// Kubernetes secrets); the file's trailing white space is dropped. `name` is
/// the variable named in errors.
pub fn secret(
    name: &str,
    value: &Option<String>,
    file: &Option<PathBuf>,
) -> anyhow::Result<Option<String>> {
    match (value, file) {
        (Some(_), Some(_)) => bail!("set {name} or {name}_FILE, not both"),
        (Some(v), None) => Ok(Some(v.trim().to_owned())),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{name}_FILE: reading {}", p.display()))?;
            let text = text.trim();
            if text.is_empty() {
                bail!("{name}_FILE: {} is empty", p.display());
            }
            Ok(Some(text.to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// Serialises a set secret as `<redacted>`.
pub fn redact<S: serde::Serializer, T>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// Serialises a list of secrets as `<redacted>` each.
pub fn redact_all<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|_| "<redacted>"))
}

/// Serialises a database URL with its password replaced.
pub fn redact_url<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => s.serialize_str(&redacted_url(url)),
        None => s.serialize_none(),
    }
}

/// `scheme://user:<redacted>@host/...` for a URL with a password; query
/// parameters named `password` too.
pub fn redacted_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:<redacted>")
            } else {
                user.to_owned()
            };
            out = format!("{scheme}://{masked}@{host}{}", &rest[authority_end..]);
        }
    }
    if let Some((base, query)) = out.clone().split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=<redacted>"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{base}?{}", query.join("&"));
    }
    out
}

/// Serialises anything displayable as its text (addresses, networks).
pub fn display_all<S: serde::Serializer, T: std::fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

/// The effective configuration of subcommand `name` as YAML: a file that,
/// with the secrets filled back in, starts the same process.
pub fn print<T: serde::Serialize>(
    name: &str,
    args: &T,
    globals: &[(&str, &str)],
) -> anyhow::Result<String> {
    let mut section = serde_norway::to_value(args).context("rendering the configuration")?;
    if let Value::Mapping(m) = &mut section {
        for (key, value) in globals {
            m.insert(
                Value::String((*key).to_owned()),
                Value::String((*value).to_owned()),
            );
        }
    }
    let mut doc = serde_norway::Mapping::new();
    doc.insert(Value::String(name.to_owned()), section);
    serde_norway::to_string(&doc).context("rendering the configuration")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::{Args, Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, env = "VIGIL_TEST_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[arg(long, global = true, default_value = "a", value_parser = ["a", "b"])]
        mode: String,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Serve(ServeArgs),
        Other(OtherArgs),
    }

    #[derive(Args, Debug)]
    struct ServeArgs {
        #[arg(long, env = "VIGIL_TEST_LISTEN", default_value = "127.0.0.1:1")]
        listen: std::net::SocketAddr,
        #[arg(long, required = true, value_delimiter = ',')]
        peers: Vec<String>,
        #[arg(long)]
        migrate: bool,
        #[arg(long, env = "VIGIL_TEST_TOKEN")]
        token: Option<String>,
    }

    #[derive(Args, Debug)]
    struct OtherArgs {
        #[arg(long)]
        x: Option<u32>,
    }

    fn run(file: &str, args: &[&str]) -> anyhow::Result<ServeArgs> {
        match run_cli(file, args)?.command {
            Cmd::Serve(s) => Ok(s),
            Cmd::Other(_) => unreachable!(),
        }
    }

    fn run_cli(file: &str, args: &[&str]) -> anyhow::Result<Cli> {
        let dir = std::env::temp_dir().join(format!("vigil-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.yaml", ring_free_id(file)));
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = vec!["vigil".into(), "--config".into(), path.into()];
        argv.extend(args.iter().map(OsString::from));
        parse_from::<Cli>(argv)
    }

    fn ring_free_id(s: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.hash(&mut h);
        h.finish()
    }

    #[test]
    fn the_file_fills_what_flags_leave() {
        let s = run(
            "serve:\n  listen: 127.0.0.1:9\n  peers: [a, b]\n  migrate: true\nother:\n  x: 3\n",
            &["serve"],
        )
        .unwrap();
        assert_eq!(s.listen.port(), 9);
        assert_eq!(s.peers, ["a", "b"]);
        assert!(s.migrate);
        // A flag wins over the file.
        let s = run(
            "serve:\n  listen: 127.0.0.1:9\n  peers: [a]\n",
            &["serve", "--listen", "127.0.0.1:10", "--peers", "c"],
        )
        .unwrap();
        assert_eq!(
            (s.listen.port(), s.peers.as_slice()),
            (10, &["c".to_owned()][..])
        );
        // Dashes or underscores, both name the flag.
        let s = run("serve:\n  peers: a\n  token: t\n", &["serve"]).unwrap();
        assert_eq!(s.token.as_deref(), Some("t"));
    }

    #[test]
    fn any_section_sets_a_global_flag() {
        let file = "serve:\n  peers: a\n  mode: b\nother:\n  mode: a\n";
        assert_eq!(run_cli(file, &["serve"]).unwrap().mode, "b");
        assert_eq!(run_cli(file, &["other"]).unwrap().mode, "a");
        // A flag wins over the file, before or after the subcommand.
        assert_eq!(run_cli(file, &["--mode", "a", "serve"]).unwrap().mode, "a");
        assert_eq!(run_cli(file, &["serve", "--mode=a"]).unwrap().mode, "a");
        assert_eq!(
            run_cli("serve:\n  peers: a\n", &["serve"]).unwrap().mode,
            "a"
        );
        let e = run_cli("serve:\n  peers: a\n  mode: c\n", &["serve"]).unwrap_err();
        assert!(e.to_string().contains("`serve.mode`"), "{e}");
        let e = run_cli("serve:\n  lisen: 1\n", &["serve"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("listen, peers, migrate, token, mode"),
            "{e}"
        );
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = run("serve:\n  listen: nowhere\n  peers: a\n", &["serve"]).unwrap_err();
        assert!(e.to_string().contains("`serve.listen`"), "{e}");
        let e = run("serve:\n  lisen: 127.0.0.1:9\n", &["serve"]).unwrap_err();
        assert!(
            e.to_string().contains("`serve.lisen` is not a setting"),
            "{e}"
        );
        let e = run("sevre:\n  listen: 127.0.0.1:9\n", &["serve"]).unwrap_err();
        assert!(e.to_string().contains("unknown section `sevre`"), "{e}");
        let e = run("serve:\n  migrate: yes please\n  peers: a\n", &["serve"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("`serve.migrate`: expected true or false"),
            "{e}"
        );
        let e = run("serve:\n  peers: {a: 1}\n", &["serve"]).unwrap_err();
        assert!(e.to_string().contains("`serve.peers`"), "{e}");
        let e = run("serve: [1\n", &["serve"]).unwrap_err();
        assert!(e.to_string().contains("not valid YAML"), "{e}");
        let e = run("serve:\n  config: x\n", &["serve"]).unwrap_err();
        assert!(e.to_string().contains("is not a setting"), "{e}");
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redacted_url("postgres://vigil:s3cr@t@db:5432/vigil?sslmode=require"),
            "postgres://vigil:<redacted>@db:5432/vigil?sslmode=require"
        );
        assert_eq!(
            redacted_url("postgres://db/vigil?user=v&password=p"),
            "postgres://db/vigil?user=v&password=<redacted>"
        );
        assert_eq!(
            redacted_url("sqlite://v.db?mode=rwc"),
            "sqlite://v.db?mode=rwc"
        );
        assert_eq!(redacted_url("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    fn secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("vigil-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, "abc\n").unwrap();
        assert_eq!(
            secret("VIGIL_X", &None, &Some(p.clone()))
                .unwrap()
                .as_deref(),
            Some("abc")
        );
        assert!(secret("VIGIL_X", &Some("a".into()), &Some(p.clone())).is_err());
        std::fs::write(&p, " \n").unwrap();
        assert!(secret("VIGIL_X", &None, &Some(p)).is_err());
        assert!(secret("VIGIL_X", &None, &Some(dir.join("missing")))
            .unwrap_err()
            .to_string()
            .contains("VIGIL_X_FILE"));
    }
}

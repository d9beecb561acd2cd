//! Where vigilctl finds its endpoint and token: flags, then the environment,
//! then the config file, then the default endpoint.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// The endpoint used when none is configured: `vigil control`'s default `--admin-listen`.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8080";

/// The config file's name inside its directory.
const FILE_NAME: &str = "vigilctl.json";

/// The process environment vigilctl reads, captured once so the rest is pure.
/// Empty variables count as unset.
#[derive(Default, Clone)]
pub struct Env {
    /// `VIGIL_ENDPOINT`.
    pub endpoint: Option<String>,
    /// `VIGIL_TOKEN`.
    pub token: Option<String>,
    /// `VIGIL_CONFIG_DIR`: the directory holding `vigilctl.json`.
    pub config_dir: Option<PathBuf>,
    /// `XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `HOME`.
    pub home: Option<PathBuf>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Env {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let path = |n: &str| {
            std::env::var_os(n)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Env {
            endpoint: var("VIGIL_ENDPOINT"),
            token: var("VIGIL_TOKEN"),
            config_dir: path("VIGIL_CONFIG_DIR"),
            xdg_config_home: path("XDG_CONFIG_HOME"),
            home: path("HOME"),
        }
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("config_dir", &self.config_dir)
            .finish_non_exhaustive()
    }
}

/// The config file: `$VIGIL_CONFIG_DIR/vigilctl.json`, else
/// `${XDG_CONFIG_HOME:-$HOME/.config}/vigil/vigilctl.json` (a relative
/// `XDG_CONFIG_HOME` is ignored, as the XDG specification asks).
pub fn path(env: &Env) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &env.config_dir {
        return Ok(dir.join(FILE_NAME));
    }
    let base = match (&env.xdg_config_home, &env.home) {
        (Some(x), _) if x.is_absolute() => x.clone(),
        (_, Some(home)) => home.join(".config"),
        _ => bail!("cannot place the config file: set VIGIL_CONFIG_DIR, XDG_CONFIG_HOME or HOME"),
    };
    Ok(base.join("vigil").join(FILE_NAME))
}

/// What the config file holds.
#[derive(Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileConfig {
    /// Base URL of the admin API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Bearer token for the admin API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Reads the config file; a missing file is an empty configuration.
pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // serde_json's messages quote no input, so a token cannot leak through them.
    serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

/// Writes the config file readable by its owner only (0600, directory 0700),
/// replacing it atomically so a crash never leaves half a file.
pub fn save(path: &Path, config: &FileConfig) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .context("the config file's path has no directory")?;
    create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut text = serde_json::to_vec_pretty(config).context("encoding the configuration")?;
    text.push(b'\n');
    let write = || -> std::io::Result<()> {
        let mut f = private_file(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Where a setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// `VIGIL_ENDPOINT` / `VIGIL_TOKEN`.
    Env,
    /// The config file.
    File,
    /// Built in.
    Default,
}

impl Source {
    /// In words, naming the flag or variable of `setting` (`endpoint`, `token`).
    pub fn describe(self, setting: &str) -> String {
        match self {
            Source::Flag => format!("--{setting}"),
            Source::Env => format!("VIGIL_{}", setting.to_ascii_uppercase()),
            Source::File => "the config file".into(),
            Source::Default => "the default".into(),
        }
    }
}

/// The endpoint and token in effect.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// Base URL of the admin API, without a trailing `/`.
    pub endpoint: String,
    /// Where it came from.
    pub endpoint_source: Source,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// Where it came from (`Default` when there is none).
    pub token_source: Source,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint", &self.endpoint)
            .field("endpoint_source", &self.endpoint_source)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_source", &self.token_source)
            .finish()
    }
}

/// Flag over environment over file; the endpoint falls back to [`DEFAULT_ENDPOINT`].
/// Empty values count as unset.
pub fn resolve(
    flag_endpoint: Option<&str>,
    flag_token: Option<&str>,
    env: &Env,
    file: &FileConfig,
) -> Settings {
    fn pick(flag: Option<&str>, env: Option<&str>, file: Option<&str>) -> Option<(String, Source)> {
        [
            (flag, Source::Flag),
            (env, Source::Env),
            (file, Source::File),
        ]
        .into_iter()
        .find_map(|(v, s)| v.filter(|v| !v.is_empty()).map(|v| (v.to_owned(), s)))
    }
    let (endpoint, endpoint_source) = pick(
        flag_endpoint,
        env.endpoint.as_deref(),
        file.endpoint.as_deref(),
    )
    .unwrap_or_else(|| (DEFAULT_ENDPOINT.to_owned(), Source::Default));
    let (token, token_source) = match pick(flag_token, env.token.as_deref(), file.token.as_deref())
    {
        Some((t, s)) => (Some(t), s),
        None => (None, Source::Default),
    };
    Settings {
        endpoint: endpoint.trim_end_matches('/').to_owned(),
        endpoint_source,
        token,
        token_source,
    }
}

/// Checks that `endpoint` is an `http://` or `https://` base URL and returns it
/// without a trailing `/`.
pub fn check_endpoint(endpoint: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(endpoint)
        .with_context(|| format!("`{endpoint}` is not a URL (expected e.g. {DEFAULT_ENDPOINT})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("`{endpoint}` is not an http:// or https:// URL");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("`{endpoint}` must not have a query or fragment");
    }
    Ok(endpoint.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env {
            endpoint: Some("http://env:1".into()),
            token: Some("env-token".into()),
            ..Env::default()
        }
    }

    fn file() -> FileConfig {
        FileConfig {
            endpoint: Some("http://file:1/".into()),
            token: Some("file-token".into()),
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let s = resolve(Some("http://flag:1"), Some("flag-token"), &env(), &file());
        assert_eq!(s.endpoint, "http://flag:1");
        assert_eq!(s.endpoint_source, Source::Flag);
        assert_eq!(s.token.as_deref(), Some("flag-token"));
        assert_eq!(s.token_source, Source::Flag);

        let s = resolve(None, None, &env(), &file());
        assert_eq!(
            (s.endpoint.as_str(), s.endpoint_source),
            ("http://env:1", Source::Env)
        );
        assert_eq!(
            (s.token.as_deref(), s.token_source),
            (Some("env-token"), Source::Env)
        );

        let s = resolve(None, None, &Env::default(), &file());
        assert_eq!(
            (s.endpoint.as_str(), s.endpoint_source),
            ("http://file:1", Source::File)
        );
        assert_eq!(
            (s.token.as_deref(), s.token_source),
            (Some("file-token"), Source::File)
        );

        let s = resolve(None, None, &Env::default(), &FileConfig::default());
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.endpoint_source, Source::Default);
        assert_eq!(s.token, None);
    }

    #[test]
    fn endpoint_and_token_resolve_independently() {
        let env = Env {
            token: Some("env-token".into()),
            ..Env::default()
        };
        let s = resolve(Some("http://flag:1"), None, &env, &file());
        assert_eq!(s.endpoint_source, Source::Flag);
        assert_eq!(
            (s.token.as_deref(), s.token_source),
            (Some("env-token"), Source::Env)
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let env = Env {
            endpoint: Some(String::new()),
            ..Env::default()
        };
        let s = resolve(Some(""), Some(""), &env, &file());
        assert_eq!(s.endpoint_source, Source::File);
        assert_eq!(s.token_source, Source::File);
    }

    #[test]
    fn config_path_prefers_vigil_config_dir_then_xdg_then_home() {
        let mut env = Env {
            config_dir: Some("/etc/vc".into()),
            xdg_config_home: Some("/x".into()),
            home: Some("/home/u".into()),
            ..Env::default()
        };
        assert_eq!(path(&env).unwrap(), PathBuf::from("/etc/vc/vigilctl.json"));
        env.config_dir = None;
        assert_eq!(path(&env).unwrap(), PathBuf::from("/x/vigil/vigilctl.json"));
        env.xdg_config_home = Some("relative".into());
        assert_eq!(
            path(&env).unwrap(),
            PathBuf::from("/home/u/.config/vigil/vigilctl.json")
        );
        env.xdg_config_home = None;
        assert_eq!(
            path(&env).unwrap(),
            PathBuf::from("/home/u/.config/vigil/vigilctl.json")
        );
        env.home = None;
        assert!(path(&env).is_err());
    }

    #[test]
    fn debug_output_redacts_tokens() {
        let s = resolve(None, Some("sekrit-123"), &env(), &file());
        for text in [
            format!("{s:?}"),
            format!("{:?}", file()),
            format!("{:?}", env()),
        ] {
            for secret in ["sekrit-123", "env-token", "file-token"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[test]
    fn save_then_load_round_trips_with_owner_only_mode() {
        let dir = std::env::temp_dir().join(format!("vigilctl-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("nested").join(FILE_NAME);
        assert_eq!(load(&p).unwrap(), FileConfig::default());
        save(&p, &file()).unwrap();
        save(&p, &file()).unwrap();
        assert_eq!(load(&p).unwrap(), file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&p, "{not json").unwrap();
        let err = format!("{:#}", load(&p).unwrap_err());
        assert!(err.contains("is not valid"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(check_endpoint("http://h:8080/").unwrap(), "http://h:8080");
        assert_eq!(
            check_endpoint("https://h/admin").unwrap(),
            "https://h/admin"
        );
        for bad in ["h:8080", "ftp://h", "http://h/?x=1", "not a url"] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}

//! `vigil keys generate`: every key and token a deployment needs, made from
//! the system's random source.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::Args;
use ring::rand::{SecureRandom as _, SystemRandom};

/// `vigil keys generate` flags.
#[derive(Args)]
pub struct GenerateArgs {
    /// Write each key to its own file in this directory (created, mode 0700;
    /// files 0600), refusing to overwrite. Without it, print them as
    /// `VIGIL_*=` lines and the assertion key as PEM.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// A deployment's keys, as the text each setting takes.
pub struct Keys {
    /// `VIGIL_SIGNING_KEY`: base64 Ed25519 seed (control plane only).
    pub signing_key: String,
    /// `VIGIL_SNAPSHOT_KEYS`: its public key (every proxy).
    pub snapshot_keys: String,
    /// `VIGIL_SECRET_KEY`: base64 32 bytes (control plane only).
    pub secret_key: String,
    /// `VIGIL_COOKIE_KEYS`: `1:<base64 32 bytes>` (every proxy).
    pub cookie_keys: String,
    /// `VIGIL_ASSERTION_KEY_FILE` contents: P-256 PKCS#8 PEM (every proxy).
    pub assertion_pem: String,
    /// `VIGIL_BOOTSTRAP_TOKEN` (control plane).
    pub bootstrap_token: String,
    /// `VIGIL_FLEET_JOIN_TOKEN` (control plane) = `VIGIL_JOIN_TOKEN` (proxies).
    pub join_token: String,
}

/// The files of a key directory: (file name, the setting that reads it, secret).
const FILES: &[(&str, &str, bool)] = &[
    ("signing.key", "VIGIL_SIGNING_KEY_FILE", true),
    ("snapshot-keys.pub", "VIGIL_SNAPSHOT_KEYS_FILE", false),
    ("secret.key", "VIGIL_SECRET_KEY_FILE", true),
    ("cookie.keys", "VIGIL_COOKIE_KEYS_FILE", true),
    ("assertion.pem", "VIGIL_ASSERTION_KEY_FILE", true),
    ("bootstrap.token", "VIGIL_BOOTSTRAP_TOKEN_FILE", true),
    (
        "join.token",
        "VIGIL_FLEET_JOIN_TOKEN_FILE / VIGIL_JOIN_TOKEN_FILE",
        true,
    ),
];

fn random<const N: usize>(rng: &SystemRandom) -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    rng.fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PEM armour for DER.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl Keys {
    /// A fresh set.
    pub fn generate() -> anyhow::Result<Keys> {
        let rng = SystemRandom::new();
        let (signer, seed) = vigil_snapshot::Signer::generate().context("the signing key")?;
        let assertion = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| anyhow::anyhow!("cannot generate the assertion key"))?;
        Ok(Keys {
            signing_key: seed,
            snapshot_keys: signer.public_key_base64(),
            secret_key: STANDARD.encode(random::<32>(&rng)?),
            cookie_keys: format!("1:{}", STANDARD.encode(random::<32>(&rng)?)),
            assertion_pem: pem("PRIVATE KEY", assertion.as_ref()),
            bootstrap_token: format!("vigil_boot_{}", hex(&random::<32>(&rng)?)),
            join_token: format!("vigil_join_{}", hex(&random::<32>(&rng)?)),
        })
    }

    fn texts(&self) -> [&str; 7] {
        [
            &self.signing_key,
            &self.snapshot_keys,
            &self.secret_key,
            &self.cookie_keys,
            &self.assertion_pem,
            &self.bootstrap_token,
            &self.join_token,
        ]
    }

    /// Writes the set into `dir` (see [`FILES`]), refusing to overwrite a file.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        create_private_dir(dir)?;
        for ((name, _, secret), text) in FILES.iter().zip(self.texts()) {
            let path = dir.join(name);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(if *secret { 0o600 } else { 0o644 });
            }
            let mut f = opts.open(&path).with_context(|| {
                format!(
                    "creating {} (an existing key is never overwritten)",
                    path.display()
                )
            })?;
            let mut text = text.to_owned();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            f.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Reads a set written by [`Keys::write`].
    pub fn read(dir: &Path) -> anyhow::Result<Keys> {
        let mut texts = Vec::new();
        for (name, _, _) in FILES {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            texts.push(text.trim().to_owned());
        }
        let [signing_key, snapshot_keys, secret_key, cookie_keys, assertion_pem, bootstrap_token, join_token]: [String; 7] =
            texts.try_into().map_err(|_| anyhow::anyhow!("key files"))?;
        Ok(Keys {
            signing_key,
            snapshot_keys,
            secret_key,
            cookie_keys,
            assertion_pem,
            bootstrap_token,
            join_token,
        })
    }

    /// The set in `dir`, made there first when the directory holds none.
    pub fn read_or_create(dir: &Path) -> anyhow::Result<(Keys, bool)> {
        if dir.join(FILES[0].0).exists() {
            return Ok((Keys::read(dir)?, false));
        }
        Keys::generate()?.write(dir)?;
        Ok((Keys::read(dir)?, true))
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// `vigil keys generate`.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let keys = Keys::generate()?;
    match &args.out_dir {
        Some(dir) => {
            if dir.exists() && FILES.iter().any(|(name, _, _)| dir.join(name).exists()) {
                bail!(
                    "{} already holds keys; choose an empty directory (keys are never overwritten)",
                    dir.display()
                );
            }
            keys.write(dir)?;
            println!("Keys written to {}:", dir.display());
            for (name, setting, secret) in FILES {
                let who = if *secret { "secret" } else { "public" };
                println!("  {name:<18} {setting} ({who})");
            }
            println!(
                "Give the control plane signing.key, secret.key, bootstrap.token and join.token;\n\
                 give every proxy snapshot-keys.pub, cookie.keys, assertion.pem and join.token."
            );
        }
        None => {
            println!("# Control plane");
            println!("VIGIL_SIGNING_KEY={}", keys.signing_key);
            println!("VIGIL_SECRET_KEY={}", keys.secret_key);
            println!("VIGIL_BOOTSTRAP_TOKEN={}", keys.bootstrap_token);
            println!("VIGIL_FLEET_JOIN_TOKEN={}", keys.join_token);
            println!("# Every proxy");
            println!("VIGIL_SNAPSHOT_KEYS={}", keys.snapshot_keys);
            println!("VIGIL_COOKIE_KEYS={}", keys.cookie_keys);
            println!("VIGIL_JOIN_TOKEN={}", keys.join_token);
            println!(
                "# Every proxy: save the following as a file named by VIGIL_ASSERTION_KEY_FILE"
            );
            print!("{}", keys.assertion_pem);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_generated_set_works_together() {
        let dir = std::env::temp_dir().join(format!("vigil-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (keys, made) = Keys::read_or_create(&dir).unwrap();
        assert!(made);
        let (again, made) = Keys::read_or_create(&dir).unwrap();
        assert!(!made);
        assert_eq!(again.signing_key, keys.signing_key);
        // The signing key and the public key the proxies trust are a pair.
        let signer = vigil_snapshot::Signer::from_text(&keys.signing_key).unwrap();
        let verifier = vigil_snapshot::Verifier::from_text(&keys.snapshot_keys).unwrap();
        let update = vigil_snapshot::Update::default();
        assert!(verifier.open(&signer.seal(&update)).is_ok());
        assert!(vigil_proxy::assertion::Assertions::from_pem(&keys.assertion_pem, "t").is_ok());
        assert!(keys.join_token.len() >= 32);
        assert!(keys.write(&dir).is_err(), "never overwrites");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("signing.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

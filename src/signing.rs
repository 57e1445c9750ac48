//! The server's Ed25519 signing key, with which it signs the heads it reports
//! (`domain::signed_head`): read from `--signing-key` (a PKCS#8 PEM file, as `openssl
//! genpkey -algorithm ed25519` writes), or generated into that file on the first start when
//! `--generate-signing-key` asks (mode 0600). Auditors get the public half from
//! `kpi-server public-key`.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};

/// Why there is no signing key.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    /// The file cannot be read or written.
    #[error("signing key {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no Ed25519 private key in PKCS#8 PEM.
    #[error("signing key {path}: not an Ed25519 private key in PKCS#8 PEM ({reason})")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// No random bytes for a new key.
    #[error("no random bytes for a new signing key: {0}")]
    Random(String),
}

/// The key in `path`; when the file does not exist and `generate` is set, a new key is
/// written there first (readable by the server's user only).
pub fn load(path: &Path, generate: bool) -> Result<SigningKey, SigningKeyError> {
    let io = |source| SigningKeyError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|error| SigningKeyError::Invalid {
            path: path.to_owned(),
            reason: error.to_string(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && generate => {
            let key = generate_key()?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|error| SigningKeyError::Random(error.to_string()))?;
            write_private(path, pem.as_bytes()).map_err(io)?;
            tracing::info!(path = %path.display(), public_key = %hex::encode(key.verifying_key().to_bytes()), "signing key generated");
            Ok(key)
        }
        Err(error) => Err(io(error)),
    }
}

/// The public half of `key` for auditors: SubjectPublicKeyInfo PEM (as `openssl pkey
/// -pubout` prints it) and the 32 raw bytes in hex, as `SignedHead.public_key` carries them.
pub fn public_key_text(key: &SigningKey) -> String {
    let verifying = key.verifying_key();
    let pem = verifying
        .to_public_key_pem(LineEnding::LF)
        .unwrap_or_default();
    format!("{pem}# hex: {}\n", hex::encode(verifying.to_bytes()))
}

fn generate_key() -> Result<SigningKey, SigningKeyError> {
    let mut seed = [0_u8; 32];
    getrandom::fill(&mut seed).map_err(|error| SigningKeyError::Random(error.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a new file (never over an existing one) that only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    // The new name too: a key lost to a power cut would be replaced by another one.
    match path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        Some(parent) => crate::store::sync_dir(parent),
        None => crate::store::sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_private_and_loads_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.pem");
        assert!(matches!(
            load(&path, false),
            Err(SigningKeyError::Io { .. })
        ));
        let key = load(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&path, true).unwrap().to_bytes(), key.to_bytes());
        assert!(public_key_text(&key).starts_with("-----BEGIN PUBLIC KEY-----"));
        std::fs::write(&path, "not a key").unwrap();
        let error = load(&path, true).unwrap_err().to_string();
        assert!(
            error.contains("signing.pem") && error.contains("PKCS#8"),
            "{error}"
        );
    }
}

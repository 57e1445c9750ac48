//! `kpi-server backup` and `kpi-server restore`: an online, consistent copy of the log, and
//! a new data directory made from one.
//!
//! A backup is a client of a running server: it reads the head (`GetLogInfo`, signed when
//! the server has a key), then replays the log up to that seq (`ReplayEvents`, the
//! auditor's role) into `events.bin`, checking the chain as it goes. The log is
//! append-only, so the prefix up to a head is consistent however many writes go on
//! meanwhile. `manifest.toml`, written last, names the head seq and hash, the event count
//! and the file's SHA-256: a directory without it is an unfinished backup.
//!
//! `events.bin` is the replay's `EventEnvelope` messages, each with its length as a
//! protobuf varint before it (protobuf's length-delimited framing), so any language can
//! read it.
//!
//! A restore (the server stopped, the target data directory new or empty) checks the file
//! against the manifest and the whole chain against the manifest's head before it writes
//! anything, then writes the log with the same seqs, records and hashes
//! (`store::import`). The read models are rebuilt from it at the next start.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::proto::{self, audit_client::AuditClient};
use crate::store::{self, GENESIS_HASH, Hash, ImportedEvent, StoreError, StoreOptions};
use crate::{LOG_DIR, domain::rfc3339};

/// The file of the events in a backup directory.
pub const EVENTS_FILE: &str = "events.bin";
/// The manifest of a backup directory, written last.
pub const MANIFEST_FILE: &str = "manifest.toml";
/// The version of the backup format this build writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// What a backup holds, as its manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The backup format (1).
    pub format: u32,
    /// The last seq in the backup.
    pub head_seq: u64,
    /// The chain hash after it, hex.
    pub head_hash: String,
    /// SHA-256 of `events.bin`, hex.
    pub events_sha256: String,
    /// When the backup was taken (RFC 3339).
    pub taken_at: String,
    /// The server it was taken from.
    pub server: String,
    /// The head as the server signed it, when it has a signing key, as in
    /// `kpi.v1.SignedHead` (bytes in hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_head: Option<ManifestSignedHead>,
}

/// A signed head in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSignedHead {
    /// The seq.
    pub seq: u64,
    /// The chain hash, hex.
    pub hash: String,
    /// When it was signed: Unix seconds...
    pub signed_at_seconds: i64,
    /// ...and nanoseconds.
    pub signed_at_nanos: i32,
    /// The Ed25519 public key, hex.
    pub public_key: String,
    /// The signature, hex.
    pub signature: String,
}

/// Why a backup or a restore stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server could not be reached or refused.
    #[error("server: {0}")]
    Server(String),
    /// The backup (or what the server sent) does not check out.
    #[error("{0}")]
    Invalid(String),
    /// The target is not new or empty.
    #[error("{0} is not empty: a backup or restore writes only into a new or empty directory")]
    NotEmpty(PathBuf),
    /// Writing the log failed.
    #[error("writing the log: {0}")]
    Store(#[from] StoreError),
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where and how to take a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The server's gRPC URL (`http://127.0.0.1:50051`, `https://kpi.internal:50051`).
    pub server: String,
    /// A bearer token of a principal with the auditor role, when the server asks for one.
    pub token: Option<String>,
    /// PEM of the CA that signed the server's certificate (for `https` URLs).
    pub ca_pem: Option<Vec<u8>>,
    /// The directory to write; new or empty.
    pub to: PathBuf,
}

/// Creates `dir` (and its parents) unless it exists; refuses one that holds anything.
fn new_or_empty(dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::NotEmpty(dir.to_owned()));
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        Err(error) => return Err(io_error(dir)(error)),
    }
    Ok(())
}

/// Takes a backup of the server's log as it is when the backup starts (its head then).
pub async fn backup(options: &BackupOptions) -> Result<Manifest, BackupError> {
    new_or_empty(&options.to)?;
    let server = |error: &dyn std::fmt::Display| BackupError::Server(error.to_string());
    let mut endpoint = tonic::transport::Endpoint::from_shared(options.server.clone())
        .map_err(|error| server(&error))?;
    if let Some(pem) = &options.ca_pem {
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .map_err(|error| server(&error))?;
    }
    let channel = endpoint.connect().await.map_err(|error| server(&error))?;
    let authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = options
        .token
        .as_ref()
        .map(|token| format!("Bearer {token}").parse())
        .transpose()
        .map_err(|_| BackupError::Invalid("the token is not valid in a header".into()))?;
    let mut audit =
        AuditClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(value) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        })
        .max_decoding_message_size(crate::api::MAX_DECODING_MESSAGE_SIZE);

    let info = audit
        .get_log_info(proto::GetLogInfoRequest {})
        .await
        .map_err(|status| server(&status))?
        .into_inner();
    let events_path = options.to.join(EVENTS_FILE);
    let file = File::create(&events_path).map_err(io_error(&events_path))?;
    let mut out = HashingWriter::new(BufWriter::new(file));
    let mut chain = ChainCheck::default();
    if info.head_seq > 0 {
        let mut replay = audit
            .replay_events(proto::ReplayEventsRequest {
                start: Some(proto::replay_events_request::Start::FromSeq(1)),
                to_seq: Some(info.head_seq),
                ..Default::default()
            })
            .await
            .map_err(|status| server(&status))?
            .into_inner();
        while let Some(message) = replay.next().await {
            let message = message.map_err(|status| server(&status))?;
            let Some(proto::replay_events_response::Item::Event(envelope)) = message.item else {
                continue;
            };
            chain.check(&envelope)?;
            let mut frame = Vec::with_capacity(envelope.encoded_len() + 10);
            envelope
                .encode_length_delimited(&mut frame)
                .map_err(|error| BackupError::Invalid(error.to_string()))?;
            out.write_all(&frame).map_err(io_error(&events_path))?;
        }
    }
    if chain.seq != info.head_seq || chain.hash.as_slice() != info.head_hash.as_slice() {
        return Err(BackupError::Invalid(format!(
            "the replay ended at seq {} but the head was seq {}",
            chain.seq, info.head_seq
        )));
    }
    let events_sha256 = out.finish(&events_path)?;
    let manifest = Manifest {
        format: BACKUP_FORMAT,
        head_seq: info.head_seq,
        head_hash: hex::encode(&info.head_hash),
        events_sha256,
        taken_at: rfc3339(chrono::Utc::now()),
        server: options.server.clone(),
        signed_head: info.signed_head.map(|head| {
            let at = head.signed_at.unwrap_or_default();
            ManifestSignedHead {
                seq: head.seq,
                hash: hex::encode(&head.hash),
                signed_at_seconds: at.seconds,
                signed_at_nanos: at.nanos,
                public_key: hex::encode(&head.public_key),
                signature: hex::encode(&head.signature),
            }
        }),
    };
    write_manifest(&options.to, &manifest)?;
    Ok(manifest)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let path = dir.join(MANIFEST_FILE);
    let text =
        toml::to_string(manifest).map_err(|error| BackupError::Invalid(error.to_string()))?;
    let temporary = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
    store::sync_dir(dir).map_err(io_error(dir))
}

/// The chain of the events seen so far.
struct ChainCheck {
    seq: u64,
    hash: Hash,
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH,
        }
    }
}

impl ChainCheck {
    /// Checks that `event` follows, links to the hash before it, and has the hash its
    /// record gives.
    fn check(&mut self, event: &proto::EventEnvelope) -> Result<(), BackupError> {
        let seq = event.seq;
        let broken = |reason: &str| BackupError::Invalid(format!("seq {seq}: {reason}"));
        if seq != self.seq + 1 {
            return Err(broken(&format!("expected seq {}", self.seq + 1)));
        }
        if event.prev_hash != self.hash {
            return Err(broken("its prev_hash is not the hash before it"));
        }
        let computed = store::next_hash(&self.hash, seq, &event.record);
        if event.hash != computed {
            return Err(broken("its hash is not the one its record gives"));
        }
        self.seq = seq;
        self.hash = computed;
        Ok(())
    }
}

/// A writer that hashes what it writes.
struct HashingWriter<W> {
    inner: W,
    sha256: Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            sha256: Sha256::new(),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sha256.update(bytes);
        self.inner.write_all(bytes)
    }
}

impl HashingWriter<BufWriter<File>> {
    /// Flushes and syncs the file; its SHA-256, hex.
    fn finish(self, path: &Path) -> Result<String, BackupError> {
        let file = self
            .inner
            .into_inner()
            .map_err(|error| io_error(path)(error.into_error()))?;
        file.sync_all().map_err(io_error(path))?;
        Ok(hex::encode(self.sha256.finalize()))
    }
}

/// The envelopes of an `events.bin`, in order.
struct Envelopes {
    reader: BufReader<File>,
    path: PathBuf,
}

impl Iterator for Envelopes {
    type Item = Result<proto::EventEnvelope, BackupError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut length = Vec::with_capacity(10);
        loop {
            let mut byte = [0_u8; 1];
            match self.reader.read(&mut byte) {
                Ok(0) if length.is_empty() => return None,
                Ok(0) => {
                    return Some(Err(BackupError::Invalid(format!(
                        "{} ends inside a length",
                        self.path.display()
                    ))));
                }
                Ok(_) => {
                    length.push(byte[0]);
                    if byte[0] < 0x80 || length.len() >= 10 {
                        break;
                    }
                }
                Err(error) => return Some(Err(io_error(&self.path)(error))),
            }
        }
        let Some((length, _)) = store::read_varint(&length) else {
            return Some(Err(BackupError::Invalid(format!(
                "{}: a damaged length",
                self.path.display()
            ))));
        };
        if length > crate::api::MAX_DECODING_MESSAGE_SIZE as u64 {
            return Some(Err(BackupError::Invalid(format!(
                "{}: an event of {length} bytes",
                self.path.display()
            ))));
        }
        let mut bytes = vec![0; length as usize];
        if let Err(error) = self.reader.read_exact(&mut bytes) {
            return Some(Err(io_error(&self.path)(error)));
        }
        Some(
            proto::EventEnvelope::decode(bytes.as_slice())
                .map_err(|error| BackupError::Invalid(format!("{}: {error}", self.path.display()))),
        )
    }
}

fn envelopes(dir: &Path) -> Result<Envelopes, BackupError> {
    let path = dir.join(EVENTS_FILE);
    let file = File::open(&path).map_err(io_error(&path))?;
    Ok(Envelopes {
        reader: BufReader::new(file),
        path,
    })
}

/// Reads and checks the manifest of the backup in `from`.
pub fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let manifest: Manifest = toml::from_str(&text)
        .map_err(|error| BackupError::Invalid(format!("{}: {error}", path.display())))?;
    if manifest.format != BACKUP_FORMAT {
        return Err(BackupError::Invalid(format!(
            "{}: backup format {} (this build reads {BACKUP_FORMAT})",
            path.display(),
            manifest.format
        )));
    }
    Ok(manifest)
}

/// Checks the backup in `from` whole, writing nothing: the file's SHA-256 and the chain
/// up to the manifest's head. Returns the manifest.
pub fn check(from: &Path) -> Result<Manifest, BackupError> {
    let manifest = read_manifest(from)?;
    let path = from.join(EVENTS_FILE);
    let mut file = BufReader::new(File::open(&path).map_err(io_error(&path))?);
    let mut sha256 = Sha256::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(&path))?;
        if read == 0 {
            break;
        }
        sha256.update(&buffer[..read]);
    }
    if hex::encode(sha256.finalize()) != manifest.events_sha256 {
        return Err(BackupError::Invalid(format!(
            "{} does not have the SHA-256 its manifest names: the backup was changed or damaged",
            path.display()
        )));
    }
    let mut chain = ChainCheck::default();
    for envelope in envelopes(from)? {
        chain.check(&envelope?)?;
    }
    if chain.seq != manifest.head_seq || hex::encode(chain.hash) != manifest.head_hash {
        return Err(BackupError::Invalid(format!(
            "the events end at seq {} with hash {}, but the manifest names seq {} with hash {}: refused",
            chain.seq,
            hex::encode(chain.hash),
            manifest.head_seq,
            manifest.head_hash
        )));
    }
    Ok(manifest)
}

/// Restores the backup in `from` into `data_dir` (new or empty): checks it whole first,
/// then writes the log. On an error nothing is left in `data_dir`.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    options: &StoreOptions,
) -> Result<Manifest, BackupError> {
    let manifest = check(from)?;
    new_or_empty(data_dir)?;
    let written = (|| {
        let events = envelopes(from)?.map(|envelope| {
            let envelope = envelope.map_err(|error| StoreError::Corrupt {
                seq: 0,
                reason: error.to_string(),
            })?;
            let hash =
                Hash::try_from(envelope.hash.as_slice()).map_err(|_| StoreError::Corrupt {
                    seq: envelope.seq,
                    reason: "a hash that is not 32 bytes".into(),
                })?;
            Ok(ImportedEvent {
                seq: envelope.seq,
                record: envelope.record,
                hash,
            })
        });
        let head = store::import(&data_dir.join(LOG_DIR), options, events)?;
        if head.seq != manifest.head_seq || hex::encode(head.hash) != manifest.head_hash {
            return Err(BackupError::Invalid(
                "the restored log's head is not the manifest's".into(),
            ));
        }
        Ok(())
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(error);
    }
    Ok(manifest)
}

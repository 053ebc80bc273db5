//! Durable, verified checkpoints in the layout of docs/PROTOCOL.md, section 6.
//!
//! [`Checkpoints::save`] creates a `.tmp-ckpt-*` directory, lets the trainer write its files there (with
//! mlx-rs: the model's and the optimizer's safetensors), then writes `meta.json` with the size and SHA-256 of
//! every file, makes everything durable, renames the directory to `ckpt-NNNNNNNNNN` atomically and keeps the
//! newest K. [`Checkpoints::latest`] returns the newest checkpoint whose files all verify.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::checksum::crc32_file;
use crate::sys;

/// Format number written to `meta.json`.
pub const FORMAT: u64 = 1;
/// The record every checkpoint holds besides its files.
pub const META_FILE: &str = "meta.json";
const RESERVED: [&str; 4] = ["step", "created", "format", "files"];

/// A checkpoint could not be written, or a checkpoint directory does not verify.
#[derive(Debug)]
pub enum CheckpointError {
    /// An I/O error, with the path it concerns.
    Io { path: PathBuf, source: io::Error },
    /// A checkpoint directory failed verification.
    Damaged { path: PathBuf, problem: String },
    /// A caller error (reserved meta key, the trainer wrote `meta.json` itself).
    Invalid(String),
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            CheckpointError::Damaged { path, problem } => write!(f, "damaged checkpoint {}: {problem}", path.display()),
            CheckpointError::Invalid(problem) => f.write_str(problem),
        }
    }
}

impl std::error::Error for CheckpointError {}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// A verified checkpoint found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub step: u64,
    pub path: PathBuf,
    /// The whole `meta.json` record (format, step, created, files and the writer's own keys).
    pub meta: Map<String, Value>,
}

/// A checkpoint just made durable.
#[derive(Debug, Clone)]
pub struct Saved {
    pub step: u64,
    pub path: PathBuf,
    /// Total size of its files, `meta.json` included.
    pub nbytes: u64,
    pub seconds: f64,
}

/// The checkpoint directory of one job.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

/// Directory name of checkpoint `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("ckpt-{step:010}")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?;
    if digits.len() < 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `(kind, step, pid)` of a scratch directory name `.{tmp|trash|prune}-ckpt-STEP-PID-HEX`.
fn parse_scratch(name: &str) -> Option<(&str, u64, i64)> {
    let rest = name.strip_prefix('.')?;
    let (kind, rest) = rest.split_once("-ckpt-")?;
    let mut parts = rest.splitn(3, '-');
    let step = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let hex = parts.next()?;
    let valid = ["tmp", "trash", "prune"].contains(&kind) && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    valid.then_some((kind, step, pid))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) and size of a file; with `sync` also make it durable first.
pub fn hash_file(path: &Path, sync: bool) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    if sync {
        sys::durable(&file)?;
    }
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Files under `root`, as sorted '/'-separated relative names; subdirectories are made durable on the way.
fn files_under(root: &Path, sync: bool) -> io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(root).expect("walked from root");
                found.push(relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
        if sync && dir != root {
            sys::durable_dir(&dir)?;
        }
    }
    found.sort();
    Ok(found)
}

fn safe_name(name: &str) -> bool {
    !name.is_empty() && name != META_FILE && !name.starts_with('/')
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Check `meta.json` and every file it lists (size, then the CRC-32 when one is recorded, else the SHA-256, as
/// PROTOCOL.md 6 says); the record when all is well.
pub fn verify(path: &Path) -> Result<Map<String, Value>, String> {
    let text = fs::read(path.join(META_FILE)).map_err(|e| format!("{META_FILE}: {e}"))?;
    let meta: Value = serde_json::from_slice(&text).map_err(|e| format!("{META_FILE}: not valid JSON ({e})"))?;
    let meta = match meta {
        Value::Object(map) if map.get("format") == Some(&json!(FORMAT)) => map,
        _ => return Err(format!("{META_FILE}: not a format-{FORMAT} checkpoint record")),
    };
    let expected_step = path.file_name().and_then(|n| parse_name(&n.to_string_lossy()));
    if meta.get("step").and_then(Value::as_u64) != expected_step {
        return Err(format!("{META_FILE}: step {:?} does not match the directory name", meta.get("step")));
    }
    let files = match meta.get("files") {
        Some(Value::Object(files)) if !files.is_empty() => files,
        _ => return Err(format!("{META_FILE}: missing or malformed 'files' checksums")),
    };
    for (name, record) in files {
        let sha = record.get("sha256").and_then(Value::as_str).filter(|s| s.len() == 64
            && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let crc = match record.get("crc32") {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or(()),
        };
        let (sha, bytes, crc) = match (sha, record.get("bytes").and_then(Value::as_u64), crc) {
            (Some(sha), Some(bytes), Ok(crc)) if safe_name(name) => (sha, bytes, crc),
            _ => return Err(format!("{META_FILE}: missing or malformed 'files' checksums")),
        };
        let file = path.join(name);
        if let Some(crc) = crc {
            let (found, size) = crc32_file(&file).map_err(|e| format!("{name}: {e}"))?;
            if size != bytes {
                return Err(format!("{name}: {size} bytes, expected {bytes}"));
            }
            if found != crc {
                return Err(format!("{name}: crc32 mismatch"));
            }
            continue;
        }
        let (digest, size) = hash_file(&file, false).map_err(|e| format!("{name}: {e}"))?;
        if size != bytes {
            return Err(format!("{name}: {size} bytes, expected {bytes}"));
        }
        if digest != sha {
            return Err(format!("{name}: sha256 mismatch"));
        }
    }
    Ok(meta)
}

fn remove(path: &Path) {
    let _ = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
}

impl Checkpoints {
    /// Checkpoints of the job in `dir`, keeping the newest `keep` (at least 1) on every save.
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Self {
        Checkpoints { dir: dir.into(), keep: keep.max(1) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `(step, path)` of every checkpoint directory, oldest first; by name only, nothing is verified.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let mut found: Vec<(u64, PathBuf)> = match fs::read_dir(&self.dir) {
            Ok(entries) => entries.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| parse_name(&e.file_name().to_string_lossy()).map(|step| (step, e.path())))
                .collect(),
            Err(_) => Vec::new(),
        };
        found.sort();
        found
    }

    /// Step of the newest checkpoint by name (cheap, unverified).
    pub fn latest_step(&self) -> Option<u64> {
        self.list().last().map(|(step, _)| *step)
    }

    /// Verified checkpoints, newest first; a damaged one is reported on stderr and skipped (left on disk).
    pub fn verified(&self) -> impl Iterator<Item = Found> {
        self.clean_scratch();
        self.list().into_iter().rev().filter_map(|(step, path)| match verify(&path) {
            Ok(meta) => Some(Found { step, path, meta }),
            Err(problem) => {
                eprintln!("[mlxsup-worker] checkpoint_damaged path={} problem={problem}", path.display());
                None
            }
        })
    }

    /// The newest checkpoint that verifies.
    pub fn latest(&self) -> Option<Found> {
        self.verified().next()
    }

    /// Write checkpoint `step`: `write` puts the state's files into the directory it is given; `extra` goes
    /// into `meta.json` beside the format's own keys. Returns once the checkpoint is durable and in place.
    pub fn save<F>(&self, step: u64, extra: Map<String, Value>, write: F) -> Result<Saved, CheckpointError>
    where
        F: FnOnce(&Path) -> io::Result<()>,
    {
        if let Some(key) = RESERVED.iter().find(|key| extra.contains_key(**key)) {
            return Err(CheckpointError::Invalid(format!("meta key {key:?} is reserved by the checkpoint format")));
        }
        let started = Instant::now();
        self.ensure_dir()?;
        self.clean_scratch();
        let tmp = self.dir.join(format!(".tmp-ckpt-{step}-{}-{}", std::process::id(), sys::random_hex8()));
        fs::create_dir(&tmp).map_err(io_error(&tmp))?;
        let result = write(&tmp).map_err(io_error(&tmp)).and_then(|()| self.seal(&tmp, step, extra));
        let nbytes = match result {
            Ok(nbytes) => nbytes,
            Err(error) => {
                remove(&tmp);
                return Err(error);
            }
        };
        let final_path = self.dir.join(checkpoint_name(step));
        if let Err(error) = self.install(&tmp, &final_path, step) {
            remove(&tmp);
            return Err(error);
        }
        self.prune(&final_path);
        Ok(Saved { step, path: final_path, nbytes, seconds: started.elapsed().as_secs_f64() })
    }

    /// Hash and sync every file, write meta.json last, sync the directory; the total size in bytes.
    fn seal(&self, tmp: &Path, step: u64, extra: Map<String, Value>) -> Result<u64, CheckpointError> {
        let names = files_under(tmp, true).map_err(io_error(tmp))?;
        if names.is_empty() || names.iter().any(|n| n == META_FILE) {
            return Err(CheckpointError::Invalid(format!(
                "the trainer must write at least one file and no {META_FILE} of its own (wrote {names:?})")));
        }
        let mut files = Map::new();
        let mut total = 0;
        for name in names {
            let (digest, size) = hash_file(&tmp.join(&name), true).map_err(io_error(tmp))?;
            total += size;
            files.insert(name, json!({"sha256": digest, "bytes": size}));
        }
        let mut meta = extra;
        meta.insert("step".into(), json!(step));
        meta.insert("created".into(), json!(sys::now_unix()));
        meta.insert("format".into(), json!(FORMAT));
        meta.insert("files".into(), Value::Object(files));
        let text = serde_json::to_vec_pretty(&Value::Object(meta)).expect("a JSON map always serializes");
        let meta_path = tmp.join(META_FILE);
        let mut file = File::create(&meta_path).map_err(io_error(&meta_path))?;
        file.write_all(&text).and_then(|()| sys::durable(&file)).map_err(io_error(&meta_path))?;
        sys::durable_dir(tmp).map_err(io_error(tmp))?;
        Ok(total + text.len() as u64)
    }

    /// Rename `tmp` into place (an existing copy of the step goes aside first), then sync the parent.
    fn install(&self, tmp: &Path, final_path: &Path, step: u64) -> Result<(), CheckpointError> {
        let mut trash = None;
        if final_path.exists() {
            let aside = self.dir.join(format!(".trash-ckpt-{step}-{}-{}", std::process::id(), sys::random_hex8()));
            fs::rename(final_path, &aside).map_err(io_error(final_path))?;
            trash = Some(aside);
        }
        if let Err(source) = fs::rename(tmp, final_path) {
            if let Some(aside) = &trash {
                let _ = fs::rename(aside, final_path); // put the previous copy back
            }
            return Err(CheckpointError::Io { path: final_path.to_path_buf(), source });
        }
        sys::durable_dir(&self.dir).map_err(io_error(&self.dir))?;
        if let Some(aside) = trash {
            remove(&aside);
        }
        Ok(())
    }

    /// Delete all but the newest `keep - 1` checkpoints older than `saved` (best effort; retried on the next
    /// save). Newer ones (damaged ones the load passed over) are neither counted nor touched (PROTOCOL.md 6).
    fn prune(&self, saved: &Path) {
        let saved_step = self.list().into_iter().find(|(_, p)| p == saved).map(|(step, _)| step);
        let others: Vec<(u64, PathBuf)> = self.list().into_iter()
            .filter(|(step, p)| p != saved && saved_step.map_or(true, |s| *step < s)).collect();
        let excess = others.len().saturating_sub(self.keep - 1);
        for (step, path) in others.into_iter().take(excess) {
            let doomed = self.dir.join(format!(".prune-ckpt-{step}-{}-{}", std::process::id(), sys::random_hex8()));
            if fs::rename(&path, &doomed).is_ok() {
                remove(&doomed);
            }
        }
    }

    fn ensure_dir(&self) -> Result<(), CheckpointError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        match self.dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sys::durable_dir(parent).map_err(io_error(parent)),
            _ => Ok(()),
        }
    }

    /// Remove scratch directories of dead writers; put back a replaced step whose new copy never landed.
    fn clean_scratch(&self) {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(_) => return,
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (kind, step) = match parse_scratch(&name) {
                Some((kind, step, pid)) if !sys::pid_alive(pid) => (kind, step),
                _ => continue,
            };
            let final_path = self.dir.join(checkpoint_name(step));
            if kind == "trash" && !final_path.exists() && fs::rename(entry.path(), &final_path).is_ok() {
                continue;
            }
            remove(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scratch_names_parse() {
        assert_eq!(checkpoint_name(42), "ckpt-0000000042");
        assert_eq!(parse_name("ckpt-0000000042"), Some(42));
        assert_eq!(parse_name("ckpt-42"), None);
        assert_eq!(parse_scratch(".tmp-ckpt-7-123-9f3c1a2b"), Some(("tmp", 7, 123)));
        assert_eq!(parse_scratch(".junk-ckpt-7-123-9f"), None);
        assert!(safe_name("model/weights.safetensors") && !safe_name("../x") && !safe_name(META_FILE));
    }
}

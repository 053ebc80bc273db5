//! Checkpoint rules of docs/PROTOCOL.md 6 that a loader applies: the CRC-32 when one is recorded, else the SHA-256.

use std::fs;
use std::path::{Path, PathBuf};

use mlxsup_worker::checkpoint::verify;
use mlxsup_worker::Checkpoints;
use serde_json::{json, Map, Value};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlxsup-rust-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// A checkpoint of one file holding "123456789" (CRC-32 0xCBF43926), its meta.json's entry edited by `edit`.
fn checkpoint_with(dir: &Path, edit: impl Fn(&mut Map<String, Value>)) -> PathBuf {
    let saved = Checkpoints::new(dir, 3).save(7, Map::new(), |d| fs::write(d.join("w.bin"), b"123456789")).unwrap();
    let meta_path = saved.path.join("meta.json");
    let mut meta: Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    edit(meta["files"]["w.bin"].as_object_mut().unwrap());
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    saved.path
}

#[test]
fn a_recorded_crc32_is_what_verifies_a_file() {
    let dir = scratch("crc");
    let path = checkpoint_with(&dir, |entry| { entry.insert("crc32".into(), json!(0xCBF4_3926u32)); });
    assert!(verify(&path).is_ok());
    let path = checkpoint_with(&dir, |entry| {
        entry.insert("crc32".into(), json!(0xCBF4_3927u32));
    });
    assert_eq!(verify(&path).unwrap_err(), "w.bin: crc32 mismatch");
    // With a CRC-32 recorded the SHA-256 is not what decides (PROTOCOL.md 6), as in the Python loader.
    let path = checkpoint_with(&dir, |entry| {
        entry.insert("crc32".into(), json!(0xCBF4_3926u32));
        entry.insert("sha256".into(), json!("0".repeat(64)));
    });
    assert!(verify(&path).is_ok());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_malformed_crc32_makes_the_record_malformed() {
    let dir = scratch("crc-bad");
    for bad in [json!("cbf43926"), json!(-1), json!(1u64 << 32), json!(1.5)] {
        let path = checkpoint_with(&dir, |entry| { entry.insert("crc32".into(), bad.clone()); });
        assert_eq!(verify(&path).unwrap_err(), "meta.json: missing or malformed 'files' checksums", "{bad}");
    }
    let path = checkpoint_with(&dir, |entry| { entry.insert("crc32".into(), Value::Null); });
    assert!(verify(&path).is_ok(), "nil counts as absent: the SHA-256 decides");
    let _ = fs::remove_dir_all(&dir);
}

//! The shared test vectors (protocol/vectors/frames.json) against this crate's codec.

use std::path::PathBuf;

use mlxsup_worker::protocol::{decode, decode_parts, encode_version};
use serde_json::Value;

fn vectors() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protocol/vectors/frames.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("frames.json is JSON")
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// The parts of the vector's one ZeroMQ message (several for a `parts` vector).
fn parts(vector: &Value) -> Vec<Vec<u8>> {
    match vector.get("parts") {
        Some(parts) => parts.as_array().unwrap().iter().map(|p| unhex(p.as_str().unwrap())).collect(),
        None => vec![frame(vector)],
    }
}

fn frame(vector: &Value) -> Vec<u8> {
    if let Some(fill) = vector.get("fill") {
        let byte = u8::from_str_radix(fill["byte"].as_str().unwrap(), 16).unwrap();
        return vec![byte; fill["count"].as_u64().unwrap() as usize];
    }
    let hex = vector["hex"].as_str().unwrap();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn list<'a>(all: &'a Value, kind: &str) -> &'a Vec<Value> {
    let list = all[kind].as_array().unwrap();
    assert!(list.len() > 10, "too few {kind} vectors");
    list
}

#[test]
fn valid_frames_decode_to_the_expected_fields() {
    let all = vectors();
    for vector in list(&all, "valid") {
        let name = vector["name"].as_str().unwrap();
        let message = decode(&frame(vector)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(message.tag(), vector["type"].as_str().unwrap(), "{name}");
        let expected = vector["fields"].as_object().unwrap();
        assert_eq!(&message.to_json(), expected, "{name}");
    }
}

#[test]
fn canonical_frames_re_encode_byte_for_byte() {
    let all = vectors();
    for vector in list(&all, "valid") {
        let name = vector["name"].as_str().unwrap();
        let bytes = frame(vector);
        let again = encode_version(&decode(&bytes).unwrap(), vector["v"].as_u64().unwrap());
        assert_eq!(again == bytes, vector["canonical"].as_bool().unwrap(), "{name}");
    }
}

#[test]
fn invalid_frames_are_refused_with_their_kind() {
    let all = vectors();
    for vector in list(&all, "invalid") {
        let name = vector["name"].as_str().unwrap();
        match decode_parts(&parts(vector)) {
            Ok(message) => panic!("{name}: decoded as {message:?}"),
            Err(error) => assert_eq!(error.kind.name(), vector["error"].as_str().unwrap(), "{name}: {error}"),
        }
    }
}

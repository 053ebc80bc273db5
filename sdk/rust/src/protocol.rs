//! The worker protocol's messages and their msgpack encoding (docs/PROTOCOL.md, sections 2-4).
//!
//! A frame is one msgpack map `{"v": version, "t": type, field: value, ...}`. [`decode`] checks the version,
//! the type, every known field's presence and type, and ignores fields it does not know; an unknown type is
//! refused. [`encode`] writes `v` and `t` first, then the fields in the spec's order, leaving out optional
//! fields that hold their default, so its frames are byte for byte those of the Python SDK.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u64 = 2;
/// The oldest protocol version this crate still reads.
pub const MIN_PROTOCOL_VERSION: u64 = 1;
/// Largest frame either side accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest string field, in characters.
pub const MAX_STRING_CHARS: usize = 4096;
/// Largest integer on the wire (integers are non-negative and fit an `i64`).
pub const MAX_INT: u64 = i64::MAX as u64;
/// Most rows of a `steps` frame.
pub const MAX_STEPS_ROWS: usize = 256;
/// Deepest nesting of arrays and maps decoded (the spec requires at least 100).
pub const MAX_DEPTH: usize = 256;
/// Exit status of a worker that checkpointed and wants to be restarted.
pub const EXIT_CHECKPOINTED: i32 = 75;
/// Goodbye reason of a worker whose training is complete.
pub const FINISHED: &str = "finished";

/// Classes of invalid frames, shared with the other SDKs through the test vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    TooLarge,
    NotMsgpack,
    NotAMap,
    Version,
    UnknownType,
    MissingField,
    FieldType,
    FieldValue,
    /// A ZeroMQ message of more than one part (refused whole, even with a valid first part).
    Multipart,
}

impl ErrorKind {
    /// The kind's name in the spec and the test vectors (`too_large`, `not_msgpack`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::TooLarge => "too_large",
            ErrorKind::NotMsgpack => "not_msgpack",
            ErrorKind::NotAMap => "not_a_map",
            ErrorKind::Version => "version",
            ErrorKind::UnknownType => "unknown_type",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::FieldType => "field_type",
            ErrorKind::FieldValue => "field_value",
            ErrorKind::Multipart => "multipart",
        }
    }
}

/// A frame that is not a valid message; the message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ProtocolError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProtocolError { kind, message: message.into() }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.name())
    }
}

impl std::error::Error for ProtocolError {}

/// First message of a worker: proves the spawn with its token and says where it resumes.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub token: String,
    pub pid: u64,
    pub job: String,
    pub start_step: u64,
    pub target_steps: u64,
    pub batch: u64,
    pub accum: u64,
    /// The newest protocol version the worker speaks (default 1).
    pub protocol: u64,
    /// Optional features the worker supports, space-separated (this crate announces none).
    pub features: Option<String>,
}

/// The daemon's answer to an accepted hello: the version both sides use from now on.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    pub protocol: u64,
}

/// Telemetry after every optimizer step: memory in bytes, time in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub step: u64,
    pub batch: u64,
    pub accum: u64,
    pub loss: f64,
    pub step_seconds: f64,
    /// `None`: not measured (sent as nil, which only version 2 frames may carry); not the same as 0.
    pub mlx_active: Option<u64>,
    /// `None`: not measured.
    pub mlx_cache: Option<u64>,
    pub mlx_peak: u64,
    pub footprint: u64,
    /// Training throughput, when measured.
    pub tokens_per_second: Option<f64>,
    /// Validation loss, only on steps that computed one.
    pub val_loss: Option<f64>,
}

/// The telemetry of several held steps in one frame, one array per [`Step`] field: row *i* of every array is the
/// *i*-th step, in the order they ran (steps strictly increase), 1 to [`MAX_STEPS_ROWS`] rows. Sent only to a
/// daemon whose heartbeat carries `hold_rows` (the session's holding sends them, see [`crate::hold`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    pub step: Vec<u64>,
    pub batch: Vec<u64>,
    pub accum: Vec<u64>,
    pub loss: Vec<f64>,
    pub step_seconds: Vec<f64>,
    pub mlx_active: Vec<Option<u64>>,
    pub mlx_cache: Vec<Option<u64>>,
    pub mlx_peak: Vec<u64>,
    pub footprint: Vec<u64>,
    /// Training throughput of each row, `None` in a row that did not measure it; absent: no row did.
    pub tokens_per_second: Option<Vec<Option<f64>>>,
    /// Validation loss of each row, `None` in a row without one; absent: no row had one.
    pub val_loss: Option<Vec<Option<f64>>>,
}

impl Steps {
    /// The rows of `steps` as one message (in their order); an optional column only when some row has a value.
    pub fn of(steps: &[Step]) -> Steps {
        let column = |f: fn(&Step) -> Option<f64>| {
            let values: Vec<Option<f64>> = steps.iter().map(f).collect();
            values.iter().any(Option::is_some).then_some(values)
        };
        Steps {
            step: steps.iter().map(|s| s.step).collect(), batch: steps.iter().map(|s| s.batch).collect(),
            accum: steps.iter().map(|s| s.accum).collect(), loss: steps.iter().map(|s| s.loss).collect(),
            step_seconds: steps.iter().map(|s| s.step_seconds).collect(),
            mlx_active: steps.iter().map(|s| s.mlx_active).collect(),
            mlx_cache: steps.iter().map(|s| s.mlx_cache).collect(),
            mlx_peak: steps.iter().map(|s| s.mlx_peak).collect(),
            footprint: steps.iter().map(|s| s.footprint).collect(),
            tokens_per_second: column(|s| s.tokens_per_second), val_loss: column(|s| s.val_loss),
        }
    }

    /// How many rows (steps) it holds.
    pub fn len(&self) -> usize {
        self.step.len()
    }

    /// Whether it holds no row (never true of a valid frame).
    pub fn is_empty(&self) -> bool {
        self.step.is_empty()
    }

    /// Row `index` as a [`Step`].
    pub fn row(&self, index: usize) -> Step {
        Step {
            step: self.step[index], batch: self.batch[index], accum: self.accum[index], loss: self.loss[index],
            step_seconds: self.step_seconds[index], mlx_active: self.mlx_active[index],
            mlx_cache: self.mlx_cache[index], mlx_peak: self.mlx_peak[index], footprint: self.footprint[index],
            tokens_per_second: self.tokens_per_second.as_ref().and_then(|c| c[index]),
            val_loss: self.val_loss.as_ref().and_then(|c| c[index]),
        }
    }
}

/// A checkpoint became durable (fsynced and renamed into place).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSaved {
    pub step: u64,
    pub path: String,
    pub seconds: f64,
    pub nbytes: u64,
}

/// Last message of a worker before it exits on its own terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Goodbye {
    pub reason: String,
    pub step: u64,
}

/// Liveness, both ways: the sender's wall clock in seconds since the Unix epoch. A worker's heartbeats carry its
/// spawn token, so that they count as signs of life even before its hello (a long model load). The daemon's may
/// allow holding the telemetry of steps far from the memory bands (`hold`, `hold_below`, `hold_horizon`; see
/// docs/PROTOCOL.md), and sending held steps as [`Steps`] frames of at most `hold_rows` rows; a worker that does
/// not hold simply sends every step at once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heartbeat {
    pub sent_at: f64,
    pub token: Option<String>,
    pub hold: Option<f64>,
    pub hold_below: Option<u64>,
    pub hold_horizon: Option<u64>,
    pub hold_rows: Option<u64>,
    /// Daemon only: 1 lets a rank blocked inside a collective say so (`waiting`); this crate decodes it.
    pub report_waiting: Option<u64>,
    /// Worker only: the collective it is blocked in (no sign of life); this crate does not send it.
    pub waiting: Option<String>,
    pub waiting_seconds: Option<f64>,
}

/// What the daemon asks for at the next step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ClearCache,
    Checkpoint,
    CheckpointExit,
    /// Only sent to a worker whose hello lists the `census` feature (this crate does not).
    Census,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::ClearCache => "clear_cache",
            Action::Checkpoint => "checkpoint",
            Action::CheckpointExit => "checkpoint_exit",
            Action::Census => "census",
        }
    }

    fn parse(name: &str) -> Option<Action> {
        [Action::ClearCache, Action::Checkpoint, Action::CheckpointExit, Action::Census].into_iter().find(|a| a.name() == name)
    }
}

/// An instruction from the daemon, honoured at the worker's next step boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub action: Action,
    pub reason: String,
    /// `census`: steps between its two counts.
    pub steps: Option<u64>,
}

/// Any message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Step(Step),
    Steps(Steps),
    CheckpointSaved(CheckpointSaved),
    Goodbye(Goodbye),
    Heartbeat(Heartbeat),
    Command(Command),
}

impl Message {
    /// The type tag (`t`) of the message.
    pub fn tag(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Step(_) => "step",
            Message::Steps(_) => "steps",
            Message::CheckpointSaved(_) => "checkpoint_saved",
            Message::Goodbye(_) => "goodbye",
            Message::Heartbeat(_) => "heartbeat",
            Message::Command(_) => "command",
        }
    }

    /// Every field by name, optional ones with their defaults (`null` for an absent `val_loss`), as JSON.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        for (name, value) in self.fields() {
            map.insert(name.to_string(), value.to_json());
        }
        match self {
            Message::Hello(m) => {
                map.insert("protocol".into(), serde_json::json!(m.protocol));
                map.insert("features".into(), serde_json::json!(m.features));
            }
            Message::Command(m) => { map.insert("steps".into(), serde_json::json!(m.steps)); }
            Message::Step(m) => {
                map.insert("tokens_per_second".into(), serde_json::json!(m.tokens_per_second));
                map.insert("val_loss".into(), serde_json::json!(m.val_loss));
            }
            Message::Steps(m) => {
                map.insert("tokens_per_second".into(), serde_json::json!(m.tokens_per_second));
                map.insert("val_loss".into(), serde_json::json!(m.val_loss));
            }
            Message::Heartbeat(m) => {
                map.insert("token".into(), serde_json::json!(m.token));
                map.insert("hold".into(), serde_json::json!(m.hold));
                map.insert("hold_below".into(), serde_json::json!(m.hold_below));
                map.insert("hold_horizon".into(), serde_json::json!(m.hold_horizon));
                map.insert("hold_rows".into(), serde_json::json!(m.hold_rows));
                map.insert("report_waiting".into(), serde_json::json!(m.report_waiting));
                map.insert("waiting".into(), serde_json::json!(m.waiting));
                map.insert("waiting_seconds".into(), serde_json::json!(m.waiting_seconds));
            }
            _ => {}
        }
        map
    }

    /// Fields in the spec's order; optional ones only when they differ from their default.
    fn fields(&self) -> Vec<(&'static str, Value)> {
        use Value::{Array, Float, Int, Nil, Str};
        let ints = |column: &[u64]| Array(column.iter().map(|&n| Int(n.into())).collect());
        let floats = |column: &[f64]| Array(column.iter().map(|&x| Float(x)).collect());
        let maybe_ints = |column: &[Option<u64>]| Array(column.iter().map(|n| n.map_or(Nil, |n| Int(n.into()))).collect());
        let optional = |column: &[Option<f64>]| Array(column.iter().map(|x| x.map_or(Nil, Float)).collect());
        match self {
            Message::Hello(m) => {
                let mut f = vec![("token", Str(m.token.clone())), ("pid", Int(m.pid.into())),
                                 ("job", Str(m.job.clone())), ("start_step", Int(m.start_step.into())),
                                 ("target_steps", Int(m.target_steps.into())), ("batch", Int(m.batch.into())),
                                 ("accum", Int(m.accum.into()))];
                if m.protocol != 1 {
                    f.push(("protocol", Int(m.protocol.into())));
                }
                if let Some(features) = &m.features {
                    f.push(("features", Str(features.clone())));
                }
                f
            }
            Message::Welcome(m) => vec![("protocol", Int(m.protocol.into()))],
            Message::Step(m) => {
                let mut f = vec![("step", Int(m.step.into())), ("batch", Int(m.batch.into())),
                                 ("accum", Int(m.accum.into())), ("loss", Float(m.loss)),
                                 ("step_seconds", Float(m.step_seconds)), ("mlx_active", m.mlx_active.map_or(Nil, |n| Int(n.into()))),
                                 ("mlx_cache", m.mlx_cache.map_or(Nil, |n| Int(n.into()))), ("mlx_peak", Int(m.mlx_peak.into())),
                                 ("footprint", Int(m.footprint.into()))];
                if let Some(tokens_per_second) = m.tokens_per_second {
                    f.push(("tokens_per_second", Float(tokens_per_second)));
                }
                if let Some(val_loss) = m.val_loss {
                    f.push(("val_loss", Float(val_loss)));
                }
                f
            }
            Message::Steps(m) => {
                let mut f = vec![("step", ints(&m.step)), ("batch", ints(&m.batch)), ("accum", ints(&m.accum)),
                                 ("loss", floats(&m.loss)), ("step_seconds", floats(&m.step_seconds)),
                                 ("mlx_active", maybe_ints(&m.mlx_active)), ("mlx_cache", maybe_ints(&m.mlx_cache)),
                                 ("mlx_peak", ints(&m.mlx_peak)), ("footprint", ints(&m.footprint))];
                if let Some(tokens_per_second) = &m.tokens_per_second {
                    f.push(("tokens_per_second", optional(tokens_per_second)));
                }
                if let Some(val_loss) = &m.val_loss {
                    f.push(("val_loss", optional(val_loss)));
                }
                f
            }
            Message::CheckpointSaved(m) => vec![("step", Int(m.step.into())), ("path", Str(m.path.clone())),
                                                ("seconds", Float(m.seconds)), ("nbytes", Int(m.nbytes.into()))],
            Message::Goodbye(m) => vec![("reason", Str(m.reason.clone())), ("step", Int(m.step.into()))],
            Message::Heartbeat(m) => {
                let mut f = vec![("sent_at", Float(m.sent_at))];
                if let Some(token) = &m.token {
                    f.push(("token", Str(token.clone())));
                }
                if let Some(hold) = m.hold {
                    f.push(("hold", Float(hold)));
                }
                if let Some(below) = m.hold_below {
                    f.push(("hold_below", Int(below.into())));
                }
                if let Some(horizon) = m.hold_horizon {
                    f.push(("hold_horizon", Int(horizon.into())));
                }
                if let Some(rows) = m.hold_rows {
                    f.push(("hold_rows", Int(rows.into())));
                }
                if let Some(report) = m.report_waiting {
                    f.push(("report_waiting", Int(report.into())));
                }
                if let Some(waiting) = &m.waiting {
                    f.push(("waiting", Str(waiting.clone())));
                }
                if let Some(seconds) = m.waiting_seconds {
                    f.push(("waiting_seconds", Float(seconds)));
                }
                f
            }
            Message::Command(m) => {
                let mut f = vec![("action", Str(m.action.name().to_string())), ("reason", Str(m.reason.clone()))];
                if let Some(steps) = m.steps {
                    f.push(("steps", Int(steps.into())));
                }
                f
            }
        }
    }
}

/// A decoded msgpack value, as much of it as validation needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bin,
    Array(Vec<Value>),
    Map(Vec<(String, Value)>),
    Ext,
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bin => "bytes",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
            Value::Ext => "ext",
        }
    }

    /// The value as JSON, for [`Message::to_json`] (maps and opaque values as `null`).
    fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Int(n) => serde_json::json!(*n as u64),
            Value::Float(x) => serde_json::json!(x),
            Value::Str(s) => serde_json::json!(s),
            Value::Array(items) => items.iter().map(Value::to_json).collect(),
            _ => serde_json::Value::Null,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Int(n) if *n >= 0 => serializer.serialize_u64(*n as u64),
            Value::Int(n) => serializer.serialize_i64(*n as i64),
            Value::Float(x) => serializer.serialize_f64(*x),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Array(items) => serializer.collect_seq(items),
            _ => serializer.serialize_unit(),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a msgpack value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_f32<E>(self, v: f32) -> Result<Value, E> {
        Ok(Value::Float(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Value, E> {
        Ok(Value::Bin)
    }
    fn visit_byte_buf<E>(self, _: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bin)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        de::IgnoredAny::deserialize(d).map(|_| Value::Ext)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Value>()? {
            let key = match key {
                Value::Str(key) => key,
                other => return Err(de::Error::custom(format!("map key of type {}", other.type_name()))),
            };
            entries.push((key, map.next_value::<Value>()?));
        }
        Ok(Value::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct Frame<'a> {
    version: u64,
    message: &'a Message,
}

impl Serialize for Frame<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.message.fields();
        let mut map = serializer.serialize_map(Some(2 + fields.len()))?;
        map.serialize_entry("v", &self.version)?;
        map.serialize_entry("t", self.message.tag())?;
        for (name, value) in &fields {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Serialize one message to a frame of protocol version `version`.
pub fn encode_version(message: &Message, version: u64) -> Vec<u8> {
    rmp_serde::to_vec(&Frame { version, message }).expect("encoding into memory cannot fail")
}

/// Serialize one message to a frame (version 1, which every daemon reads).
pub fn encode(message: &Message) -> Vec<u8> {
    encode_version(message, 1)
}

/// The version a daemon speaking [`PROTOCOL_VERSION`] uses with a worker whose hello offers `worker_max`.
pub fn negotiate(worker_max: u64) -> Result<u64, ProtocolError> {
    if worker_max < MIN_PROTOCOL_VERSION {
        return Err(ProtocolError::new(ErrorKind::Version, format!("worker speaks protocol {worker_max}")));
    }
    Ok(worker_max.min(PROTOCOL_VERSION))
}

/// Decode one ZeroMQ message as received (`recv_multipart`): more than one part is refused whole.
pub fn decode_parts(parts: &[Vec<u8>]) -> Result<Message, ProtocolError> {
    match parts {
        [frame] => decode(frame),
        _ => Err(ProtocolError::new(ErrorKind::Multipart,
                                    format!("a message of {} parts: a frame is one single-part message", parts.len()))),
    }
}

/// Parse and validate one frame. Unknown fields are ignored; anything invalid is a [`ProtocolError`].
pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    if frame.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::new(ErrorKind::TooLarge,
                                      format!("frame of {} bytes exceeds {MAX_MESSAGE_BYTES}", frame.len())));
    }
    let mut cursor = std::io::Cursor::new(frame);
    let mut deserializer = rmp_serde::Deserializer::new(&mut cursor);
    deserializer.set_max_depth(MAX_DEPTH); // every level is a stack frame of the visitor
    let body = Value::deserialize(&mut deserializer)
        .map_err(|e| ProtocolError::new(ErrorKind::NotMsgpack, format!("frame is not valid msgpack: {e}")))?;
    if cursor.position() as usize != frame.len() {
        return Err(ProtocolError::new(ErrorKind::NotMsgpack, "trailing bytes after the frame's value"));
    }
    let entries = match body {
        Value::Map(entries) => entries,
        other => return Err(ProtocolError::new(ErrorKind::NotAMap,
                                               format!("frame must be a map, got {}", other.type_name()))),
    };
    let fields = Fields { tag: "", entries: &entries };
    match fields.get("v") {
        Some(Value::Int(v)) if (MIN_PROTOCOL_VERSION as i128..=PROTOCOL_VERSION as i128).contains(v) => {}
        other => return Err(ProtocolError::new(ErrorKind::Version, format!("protocol version {other:?} is not supported"))),
    }
    let tag = match fields.get("t") {
        Some(Value::Str(tag)) => tag.as_str(),
        other => return Err(ProtocolError::new(ErrorKind::UnknownType, format!("unknown message type {other:?}"))),
    };
    Fields { tag, entries: &entries }.message()
}

struct Fields<'a> {
    tag: &'a str,
    entries: &'a [(String, Value)],
}

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.entries.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value)
    }

    fn error(&self, kind: ErrorKind, name: &str, what: String) -> ProtocolError {
        ProtocolError::new(kind, format!("{}.{name}: {what}", self.tag))
    }

    fn required(&self, name: &str) -> Result<&Value, ProtocolError> {
        self.get(name).ok_or_else(|| ProtocolError::new(ErrorKind::MissingField,
                                                         format!("{}: missing field {name:?}", self.tag)))
    }

    fn int_of(&self, name: &str, value: &Value) -> Result<u64, ProtocolError> {
        match value {
            Value::Int(n) if (0..=MAX_INT as i128).contains(n) => Ok(*n as u64),
            Value::Int(n) => Err(self.error(ErrorKind::FieldValue, name, format!("{n} is outside 0..2**63-1"))),
            other => Err(self.error(ErrorKind::FieldType, name, format!("expected an integer, got {}", other.type_name()))),
        }
    }

    fn float_of(&self, name: &str, value: &Value) -> Result<f64, ProtocolError> {
        let x = match value {
            Value::Float(x) => *x,
            Value::Int(n) => *n as f64,
            other => return Err(self.error(ErrorKind::FieldType, name, format!("expected a number, got {}", other.type_name()))),
        };
        if x.is_infinite() {
            return Err(self.error(ErrorKind::FieldValue, name, "infinite value".to_string()));
        }
        Ok(x) // NaN is legal: a diverged loss is worth reporting
    }

    fn int(&self, name: &str) -> Result<u64, ProtocolError> {
        self.int_of(name, self.required(name)?)
    }

    fn int_or(&self, name: &str, default: u64) -> Result<u64, ProtocolError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(default),
            Some(value) => self.int_of(name, value),
        }
    }

    /// A required integer that may be nil ("not measured"): missing is an error, nil is `None`.
    fn int_nil(&self, name: &str) -> Result<Option<u64>, ProtocolError> {
        match self.get(name) {
            Some(Value::Nil) => Ok(None),
            _ => self.int(name).map(Some),
        }
    }

    fn int_opt(&self, name: &str) -> Result<Option<u64>, ProtocolError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(None),
            Some(value) => self.int_of(name, value).map(Some),
        }
    }

    fn float(&self, name: &str) -> Result<f64, ProtocolError> {
        self.float_of(name, self.required(name)?)
    }

    fn float_opt(&self, name: &str) -> Result<Option<f64>, ProtocolError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(None),
            Some(value) => self.float_of(name, value).map(Some),
        }
    }

    fn string(&self, name: &str) -> Result<String, ProtocolError> {
        match self.required(name)? {
            Value::Str(s) if s.chars().count() <= MAX_STRING_CHARS => Ok(s.clone()),
            Value::Str(s) => Err(self.error(ErrorKind::FieldValue, name,
                                            format!("string of {} chars exceeds {MAX_STRING_CHARS}", s.chars().count()))),
            other => Err(self.error(ErrorKind::FieldType, name, format!("expected a string, got {}", other.type_name()))),
        }
    }

    fn string_opt(&self, name: &str) -> Result<Option<String>, ProtocolError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(None),
            Some(_) => self.string(name).map(Some),
        }
    }

    fn protocol(&self, value: u64) -> Result<u64, ProtocolError> {
        if value < 1 {
            return Err(self.error(ErrorKind::FieldValue, "protocol", format!("{value} is not a protocol version")));
        }
        Ok(value)
    }

    /// The array `name` of a `steps` frame, of `rows` entries; `None` when an optional one is absent or nil.
    fn column(&self, name: &str, rows: usize, optional: bool) -> Result<Option<&[Value]>, ProtocolError> {
        let column = match self.get(name) {
            None | Some(Value::Nil) if optional => return Ok(None),
            None | Some(Value::Nil) => {
                return Err(ProtocolError::new(ErrorKind::MissingField, format!("{}: missing field {name:?}", self.tag)))
            }
            Some(Value::Array(items)) => items,
            Some(other) => return Err(self.error(ErrorKind::FieldType, name,
                                                 format!("expected an array, got {}", other.type_name()))),
        };
        if column.len() != rows {
            return Err(self.error(ErrorKind::FieldValue, name, format!("{} rows, \"step\" has {rows}", column.len())));
        }
        Ok(Some(column))
    }

    /// Refuse a column with an entry that `fits` does not accept, before any entry's value is checked.
    fn column_types(&self, name: &str, column: &[Value], expected: &str, fits: fn(&Value) -> bool)
                    -> Result<(), ProtocolError> {
        match column.iter().find(|value| !fits(value)) {
            Some(bad) => Err(self.error(ErrorKind::FieldType, name,
                                        format!("expected {expected}, got {}", bad.type_name()))),
            None => Ok(()),
        }
    }

    fn ints(&self, name: &str, rows: usize) -> Result<Vec<u64>, ProtocolError> {
        let column = self.column(name, rows, false)?.unwrap_or_default();
        self.column_types(name, column, "integers", |value| matches!(value, Value::Int(_)))?;
        column.iter().map(|value| self.int_of(name, value)).collect()
    }

    fn ints_nil(&self, name: &str, rows: usize) -> Result<Vec<Option<u64>>, ProtocolError> {
        let column = self.column(name, rows, false)?.unwrap_or_default();
        self.column_types(name, column, "integers or nil", |value| matches!(value, Value::Int(_) | Value::Nil))?;
        column.iter().map(|value| match value {
            Value::Nil => Ok(None),
            value => self.int_of(name, value).map(Some),
        }).collect()
    }

    fn floats(&self, name: &str, rows: usize) -> Result<Vec<f64>, ProtocolError> {
        let column = self.column(name, rows, false)?.unwrap_or_default();
        self.column_types(name, column, "numbers", |value| matches!(value, Value::Int(_) | Value::Float(_)))?;
        column.iter().map(|value| self.float_of(name, value)).collect()
    }

    fn floats_opt(&self, name: &str, rows: usize) -> Result<Option<Vec<Option<f64>>>, ProtocolError> {
        let Some(column) = self.column(name, rows, true)? else { return Ok(None) };
        self.column_types(name, column, "numbers or nil",
                          |value| matches!(value, Value::Int(_) | Value::Float(_) | Value::Nil))?;
        column.iter().map(|value| match value {
            Value::Nil => Ok(None),
            value => self.float_of(name, value).map(Some),
        }).collect::<Result<_, _>>().map(Some)
    }

    /// A `steps` frame, checked as the Python daemon does: the `step` array's presence, type and row count first,
    /// then every column in the spec's order (presence, type, row count, entry types, entry values), then the
    /// order of the steps.
    fn steps(&self) -> Result<Steps, ProtocolError> {
        let rows = match self.get("step") {
            None | Some(Value::Nil) => return Err(ProtocolError::new(ErrorKind::MissingField,
                                                                     format!("{}: missing field \"step\"", self.tag))),
            Some(Value::Array(rows)) if (1..=MAX_STEPS_ROWS).contains(&rows.len()) => rows.len(),
            Some(Value::Array(rows)) => {
                return Err(self.error(ErrorKind::FieldValue, "step",
                                      format!("{} rows, expected 1..{MAX_STEPS_ROWS}", rows.len())))
            }
            Some(other) => return Err(self.error(ErrorKind::FieldType, "step",
                                                 format!("expected an array, got {}", other.type_name()))),
        };
        let steps = Steps {
            step: self.ints("step", rows)?, batch: self.ints("batch", rows)?, accum: self.ints("accum", rows)?,
            loss: self.floats("loss", rows)?, step_seconds: self.floats("step_seconds", rows)?,
            mlx_active: self.ints_nil("mlx_active", rows)?, mlx_cache: self.ints_nil("mlx_cache", rows)?,
            mlx_peak: self.ints("mlx_peak", rows)?, footprint: self.ints("footprint", rows)?,
            tokens_per_second: self.floats_opt("tokens_per_second", rows)?,
            val_loss: self.floats_opt("val_loss", rows)?,
        };
        if steps.step.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(self.error(ErrorKind::FieldValue, "step", "steps must strictly increase".to_string()));
        }
        Ok(steps)
    }

    fn message(&self) -> Result<Message, ProtocolError> {
        Ok(match self.tag {
            "hello" => Message::Hello(Hello {
                token: self.string("token")?, pid: self.int("pid")?, job: self.string("job")?,
                start_step: self.int("start_step")?, target_steps: self.int("target_steps")?,
                batch: self.int("batch")?, accum: self.int("accum")?,
                protocol: self.protocol(self.int_or("protocol", 1)?)?,
                features: self.string_opt("features")?,
            }),
            "welcome" => Message::Welcome(Welcome { protocol: self.protocol(self.int("protocol")?)? }),
            "step" => Message::Step(Step {
                step: self.int("step")?, batch: self.int("batch")?, accum: self.int("accum")?,
                loss: self.float("loss")?, step_seconds: self.float("step_seconds")?,
                mlx_active: self.int_nil("mlx_active")?, mlx_cache: self.int_nil("mlx_cache")?,
                mlx_peak: self.int("mlx_peak")?, footprint: self.int("footprint")?,
                tokens_per_second: self.float_opt("tokens_per_second")?,
                val_loss: self.float_opt("val_loss")?,
            }),
            "steps" => Message::Steps(self.steps()?),
            "checkpoint_saved" => Message::CheckpointSaved(CheckpointSaved {
                step: self.int("step")?, path: self.string("path")?, seconds: self.float("seconds")?,
                nbytes: self.int("nbytes")?,
            }),
            "goodbye" => Message::Goodbye(Goodbye { reason: self.string("reason")?, step: self.int("step")? }),
            "heartbeat" => Message::Heartbeat(Heartbeat {
                sent_at: self.float("sent_at")?, token: self.string_opt("token")?, hold: self.float_opt("hold")?,
                hold_below: self.int_opt("hold_below")?, hold_horizon: self.int_opt("hold_horizon")?,
                hold_rows: self.int_opt("hold_rows")?, report_waiting: self.int_opt("report_waiting")?,
                waiting: self.string_opt("waiting")?, waiting_seconds: self.float_opt("waiting_seconds")?,
            }),
            "command" => {
                let name = self.string("action")?;
                let reason = self.string("reason")?;
                let action = Action::parse(&name).ok_or_else(|| {
                    self.error(ErrorKind::FieldValue, "action", format!("unknown action {name:?}"))
                })?;
                Message::Command(Command { action, reason, steps: self.int_opt("steps")? })
            }
            other => return Err(ProtocolError::new(ErrorKind::UnknownType, format!("unknown message type {other:?}"))),
        })
    }
}

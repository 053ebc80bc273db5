//! Holding (docs/PROTOCOL.md 3, "Holding, exactly") against the shared vectors: which steps wait, which go,
//! and the `steps` frames they go as, byte for byte those of protocol/vectors/frames.json.

use std::path::PathBuf;

use mlxsup_worker::hold::{batch, Grant, StepHold};
use mlxsup_worker::protocol::{decode, encode_version, CheckpointSaved, Heartbeat, Message, Step, Steps};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn vector(name: &str) -> (Vec<u8>, u64) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../protocol/vectors/frames.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let found = all["valid"].as_array().unwrap().iter().find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no valid vector {name}"));
    let hex = found["hex"].as_str().unwrap();
    let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    (bytes, found["v"].as_u64().unwrap())
}

fn heartbeat(name: &str) -> Heartbeat {
    match decode(&vector(name).0).unwrap() {
        Message::Heartbeat(beat) => beat,
        other => panic!("{name} is a {}", other.tag()),
    }
}

fn steps_vector(name: &str) -> (Steps, Vec<u8>, u64) {
    let (bytes, v) = vector(name);
    match decode(&bytes).unwrap() {
        Message::Steps(steps) => (steps, bytes, v),
        other => panic!("{name} is a {}", other.tag()),
    }
}

/// A heartbeat granting `hold` seconds under `below` bytes, `horizon` steps ahead, `rows` rows a frame.
fn grant(below: u64, horizon: u64, rows: Option<u64>) -> Heartbeat {
    Heartbeat { sent_at: 1.0, hold: Some(0.25), hold_below: Some(below), hold_horizon: Some(horizon),
                hold_rows: rows, ..Heartbeat::default() }
}

fn step(n: u64, footprint: u64) -> Step {
    Step { step: n, batch: 8, accum: 1, loss: 0.5, step_seconds: 0.01, mlx_active: None, mlx_cache: None,
           mlx_peak: 0, footprint, tokens_per_second: None, val_loss: None }
}

/// The step numbers each message carries, a `step` frame as `[n]`.
fn rows(messages: &[Message]) -> Vec<Vec<u64>> {
    messages.iter().map(|m| match m {
        Message::Step(s) => vec![s.step],
        Message::Steps(s) => s.step.clone(),
        other => panic!("a {} among the steps", other.tag()),
    }).collect()
}

/// A hold past its first step (always sent) under `beat`, the previous step at `footprint`.
fn holding(beat: &Heartbeat, footprint: u64) -> StepHold {
    let mut hold = StepHold::default();
    assert!(hold.configure(beat).is_empty());
    assert_eq!(rows(&hold.step(step(1, footprint), 0.0)), vec![vec![1]], "the first step of a process goes at once");
    hold
}

#[test]
fn held_rows_go_as_the_vectors_steps_frames_byte_for_byte() {
    for name in ["steps", "steps_with_optional_columns", "steps_not_measured"] {
        let (steps, bytes, v) = steps_vector(name);
        let messages = batch((0..steps.len()).map(|i| steps.row(i)).collect(), 256);
        assert_eq!(messages.len(), 1, "{name}");
        assert_eq!(encode_version(&messages[0], v), bytes, "{name}");
    }
    let (one, bytes, v) = steps_vector("steps_one_row");
    assert_eq!(encode_version(&Message::Steps(Steps::of(&[one.row(0)])), v), bytes);
    assert_eq!(batch(vec![one.row(0)], 256), vec![Message::Step(one.row(0))], "a run of one stays a step frame");
}

#[test]
fn the_vectors_heartbeat_with_hold_rows_grants_holding_and_rows() {
    let beat = heartbeat("heartbeat_with_hold_rows");
    assert_eq!(Grant::of(&beat), Some(Grant { hold: 0.25, below: 3 << 30, horizon: 6 }));
    let mut hold = holding(&beat, MIB);
    assert_eq!(hold.rows(), 256);
    for n in 2..=5 {
        assert!(hold.step(step(n, MIB), 0.125).is_empty(), "calm step {n} is held");
    }
    assert!(!hold.due(0.374) && hold.due(0.375), "due once the oldest has waited hold seconds");
    assert_eq!((hold.due_in(0.25), hold.due_in(0.5)), (Some(0.125), Some(0.0)));
    assert_eq!(rows(&hold.step(step(6, MIB), 0.375)), vec![vec![2, 3, 4, 5, 6]], "one steps frame");
    assert_eq!(hold.due_in(0.375), None, "nothing held");
}

#[test]
fn hold_without_hold_below_grants_nothing() {
    let beat = heartbeat("heartbeat_hold_without_hold_below");
    assert_eq!(Grant::of(&beat), None);
    let mut hold = holding(&beat, MIB);
    for n in 2..=4 {
        assert_eq!(rows(&hold.step(step(n, MIB), 0.0)), vec![vec![n]], "step {n} goes at once");
    }
    assert_eq!(Grant::of(&Heartbeat { hold: Some(0.0), ..grant(1 << 40, 6, None) }), None, "hold 0 allows nothing");
}

#[test]
fn growth_per_step_is_the_last_difference_looked_ahead_horizon_steps() {
    // PROTOCOL.md's example in MiB: 1024 at step 40, 1034 at step 41, horizon 6: calm while 1034 + 6 × 10 < below.
    for (below, calm) in [(1094 * MIB, false), (1094 * MIB + 1, true)] {
        let mut hold = StepHold::default();
        hold.configure(&grant(below, 6, None));
        assert_eq!(hold.step(step(40, 1024 * MIB), 0.0).len(), 1, "the first step goes at once");
        assert_eq!(hold.step(step(41, 1034 * MIB), 0.0).is_empty(), calm, "below {below}");
    }
    // Over a gap of 4 steps the growth is the difference divided by 4: 1024 → 1064 is 10 a step.
    let mut hold = StepHold::default();
    hold.configure(&grant(1124 * MIB, 6, None));
    hold.step(step(40, 1024 * MIB), 0.0);
    assert_eq!(hold.step(step(44, 1064 * MIB), 0.0).len(), 1, "1064 + 60 is not under 1124");
    // A shrinking footprint counts as no growth: only the footprint itself is compared.
    let mut hold = StepHold::default();
    hold.configure(&grant(1000 * MIB, 1_000_000, None));
    hold.step(step(1, 999 * MIB), 0.0);
    assert!(hold.step(step(2, 900 * MIB), 0.0).is_empty());
}

#[test]
fn the_transient_counts_unless_mlx_active_is_not_measured() {
    let below = 100 * MIB;
    let peaky = |n: u64, active: Option<u64>| Step { mlx_active: active, mlx_peak: 60 * MIB, ..step(n, 50 * MIB) };
    let mut hold = holding(&grant(below, 0, None), 50 * MIB);
    assert_eq!(hold.step(peaky(2, Some(0)), 0.0).len(), 1, "50 + (60 − 0) is not under 100: sent at once");
    assert!(hold.step(peaky(3, Some(20 * MIB)), 0.0).is_empty(), "50 + 40 is under 100: held");
    assert!(hold.step(peaky(4, None), 0.0).is_empty(), "not measured: the transient counts as 0");
}

#[test]
fn a_step_that_is_not_calm_goes_at_once_after_the_held_ones_as_rows_allow() {
    let mut hold = holding(&grant(100 * MIB, 0, Some(2)), MIB);
    for n in 2..=4 {
        assert!(hold.step(step(n, MIB), 0.0).is_empty());
    }
    assert_eq!(rows(&hold.step(step(5, 100 * MIB), 0.1)), vec![vec![2, 3], vec![4, 5]], "at most hold_rows rows");
    let mut single = holding(&grant(100 * MIB, 0, None), MIB);
    single.step(step(2, MIB), 0.0);
    assert_eq!(rows(&single.step(step(3, 200 * MIB), 0.0)), vec![vec![2], vec![3]], "no hold_rows: step frames");
}

#[test]
fn a_command_flushes_within_the_old_rows_and_withdraws_holding_and_rows() {
    let mut hold = holding(&grant(100 * MIB, 0, Some(256)), MIB);
    for n in 2..=4 {
        hold.step(step(n, MIB), 0.0);
    }
    assert_eq!(rows(&hold.command()), vec![vec![2, 3, 4]], "held steps go at once, as one steps frame");
    assert_eq!((hold.grant(), hold.rows()), (None, 0));
    for n in 5..=7 {
        assert_eq!(rows(&hold.step(step(n, MIB), 1.0)), vec![vec![n]], "after the command: one step frame each");
    }
    hold.configure(&grant(100 * MIB, 0, Some(256)));
    assert!(hold.step(step(8, MIB), 1.0).is_empty(), "the next heartbeat grants holding again");
}

#[test]
fn a_heartbeat_that_withdraws_or_narrows_the_permission_flushes_the_held_steps() {
    let mut hold = holding(&grant(100 * MIB, 0, Some(256)), MIB);
    hold.step(step(2, MIB), 0.0);
    hold.step(step(3, MIB), 0.0);
    assert!(hold.configure(&grant(200 * MIB, 0, Some(256))).is_empty(), "a wider permission keeps them");
    assert!(hold.step(step(4, MIB), 0.0).is_empty());
    assert_eq!(rows(&hold.configure(&grant(150 * MIB, 0, Some(256)))), vec![vec![2, 3, 4]], "narrowed");
    hold.step(step(5, MIB), 0.0);
    hold.step(step(6, MIB), 0.0);
    let withdrawn = Heartbeat { sent_at: 2.0, hold_rows: Some(256), ..Heartbeat::default() };
    assert_eq!(rows(&hold.configure(&withdrawn)), vec![vec![5], vec![6]], "withdrawn: no steps frame any more");
    assert_eq!(rows(&hold.step(step(7, MIB), 0.0)), vec![vec![7]]);
}

#[test]
fn any_other_frame_goes_after_the_held_steps() {
    let mut hold = holding(&grant(100 * MIB, 0, Some(256)), MIB);
    hold.step(step(2, MIB), 0.0);
    hold.step(step(3, MIB), 0.0);
    let saved = Message::CheckpointSaved(CheckpointSaved { step: 3, path: "ckpt".into(), seconds: 0.1, nbytes: 1 });
    let out = hold.before(saved.clone());
    assert_eq!(out.len(), 2);
    assert_eq!(rows(&out[..1]), vec![vec![2, 3]]);
    assert_eq!(out[1], saved);
    assert_eq!(hold.held(), 0);
}

#[test]
fn a_long_run_is_cut_into_frames_of_at_most_256_rows_and_every_step_goes_once() {
    let mut hold = StepHold::new(600);
    hold.configure(&grant(100 * MIB, 0, Some(100_000)));
    assert_eq!(hold.rows(), 256, "hold_rows is capped at 256");
    let mut sent: Vec<Vec<u64>> = rows(&hold.step(step(1, MIB), 0.0));
    for n in 2..=1000 {
        sent.extend(rows(&hold.step(step(n, MIB), 0.0)));
    }
    sent.extend(rows(&hold.release()));
    assert!(sent.iter().all(|frame| frame.len() <= 256));
    assert_eq!(sent.concat(), (1..=1000).collect::<Vec<u64>>(), "no step lost, duplicated or reordered");
    assert!(sent.len() < 10, "{} frames for 1000 steps", sent.len());
}

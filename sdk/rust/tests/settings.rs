//! The `MLXSUP_*` environment (docs/PROTOCOL.md 5): types, defaults when unset or empty, errors naming the variable.

use std::collections::HashMap;

use mlxsup_worker::Settings;

fn settings(pairs: &[(&str, &str)]) -> Result<Settings, String> {
    let env: HashMap<String, String> = pairs.iter().map(|(k, v)| (format!("MLXSUP_{k}"), v.to_string())).collect();
    Settings::from_lookup(|name| env.get(name).cloned()).map_err(|e| e.to_string())
}

#[test]
fn unset_or_empty_variables_take_the_spec_defaults() {
    let defaults = settings(&[]).unwrap();
    assert_eq!(defaults, Settings::default());
    assert_eq!((defaults.job.as_str(), defaults.keep_checkpoints, defaults.orphan_timeout), ("standalone", 3, 5.0));
    assert_eq!((defaults.batch, defaults.accum, defaults.checkpoint_every), (0, 0, 0));
    assert!(defaults.endpoint.is_empty() && defaults.token.is_empty() && defaults.checkpoint_dir.is_none());
    assert_eq!(settings(&[("BATCH", ""), ("ORPHAN_TIMEOUT", ""), ("JOB", "")]).unwrap(), Settings::default());
}

#[test]
fn seconds_parse_as_numbers_with_or_without_a_fraction() {
    for (raw, seconds) in [("5", 5.0), ("5.0", 5.0), ("1.5", 1.5), ("0.25", 0.25)] {
        assert_eq!(settings(&[("ORPHAN_TIMEOUT", raw)]).unwrap().orphan_timeout, seconds, "{raw}");
    }
    for raw in ["soon", "inf", "NaN", "-1", "1e3", ".", "1.2.3"] {
        let problem = settings(&[("ORPHAN_TIMEOUT", raw)]).unwrap_err();
        assert!(problem.contains("MLXSUP_ORPHAN_TIMEOUT"), "{raw}: {problem}");
    }
}

#[test]
fn integers_are_decimal_digits_only() {
    let parsed = settings(&[("BATCH", "8"), ("ACCUM", "2"), ("KEEP_CHECKPOINTS", "4"), ("CHECKPOINT_EVERY", "50")]);
    let parsed = parsed.unwrap();
    assert_eq!((parsed.batch, parsed.accum, parsed.keep_checkpoints, parsed.checkpoint_every), (8, 2, 4, 50));
    for raw in ["8.0", "+8", "-1", " 8", "eight", "99999999999999999999"] {
        let problem = settings(&[("BATCH", raw)]).unwrap_err();
        assert!(problem.contains("MLXSUP_BATCH") && problem.contains("integer"), "{raw}: {problem}");
    }
}

#[test]
fn the_conformance_kits_steering_variables_parse_and_default_to_nothing_slow() {
    use mlxsup_worker::Steering;
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(k, _)| format!("MLXSUP_CONFORMANCE_{k}") == name).map(|(_, v)| v.to_string())
    };
    assert_eq!(Steering::from_lookup(lookup(&[])).unwrap(), Steering::default());
    let steering = Steering::from_lookup(lookup(&[("LOAD_SECONDS", "30"), ("SLOW_EVERY", "20"), ("SLOW_SECONDS", "1.5")]));
    let steering = steering.unwrap();
    assert_eq!((steering.load_seconds, steering.slow_every, steering.slow_seconds), (30.0, 20, 1.5));
    assert!(steering.slow(40) && !steering.slow(41) && !Steering::default().slow(40));
    let problem = Steering::from_lookup(lookup(&[("SLOW_EVERY", "2.5")])).unwrap_err().to_string();
    assert!(problem.contains("MLXSUP_CONFORMANCE_SLOW_EVERY"), "{problem}");
}

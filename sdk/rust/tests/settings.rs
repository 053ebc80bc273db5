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

//! Comparing two feature outputs (live and a replay, or two replays): records keyed by
//! session, channel and window; those only in one, and per field of those in both, how
//! many differ beyond the tolerance and the largest absolute and relative change.
//! What `clisonix-topics diff` prints, and what a CI gate on a new DSP version checks.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

/// A feature record's identity.
pub type Key = (String, i64, i64);

/// The key of a decoded `eeg_features` value: (session, channel, window).
pub fn key(value: &Value) -> Option<Key> {
    Some((
        value.get("session_id")?.as_str()?.to_owned(),
        value.get("channel_index")?.as_i64()?,
        value.get("window_index")?.as_i64()?,
    ))
}

/// When two numbers are the same: within `absolute`, or within `relative` of the
/// larger magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    pub absolute: f64,
    pub relative: f64,
}

impl Tolerance {
    fn beyond(&self, a: f64, b: f64) -> bool {
        if a == b || (a.is_nan() && b.is_nan()) {
            return false;
        }
        let d = (a - b).abs();
        !(d <= self.absolute || d <= self.relative * a.abs().max(b.abs()))
    }
}

/// One field's differences over the records in both outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FieldDiff {
    /// Records where it differs beyond the tolerance.
    pub changed: u64,
    pub max_abs: f64,
    pub max_rel: f64,
}

/// The comparison of two outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub records_a: u64,
    pub records_b: u64,
    pub only_in_a: u64,
    pub only_in_b: u64,
    pub in_both: u64,
    /// Records in both with at least one field beyond the tolerance.
    pub changed: u64,
    pub fields: BTreeMap<String, FieldDiff>,
    /// A few keys of each kind, for a look.
    pub examples_only_in_a: Vec<Key>,
    pub examples_only_in_b: Vec<Key>,
    pub examples_changed: Vec<Key>,
}

impl Report {
    /// Whether the two differ beyond the tolerance.
    pub fn differs(&self) -> bool {
        self.only_in_a > 0 || self.only_in_b > 0 || self.changed > 0
    }
}

/// Fields that say what a record is, not what was computed.
const IDENTITY: [&str; 5] = [
    "tenant_id",
    "session_id",
    "device_id",
    "channel_index",
    "window_index",
];

const EXAMPLES: usize = 5;

/// Compares a field of two records; answers whether it is beyond the tolerance.
fn compare(a: &Value, b: &Value, tol: &Tolerance, out: &mut FieldDiff) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            let d = (x - y).abs();
            if d.is_finite() {
                out.max_abs = out.max_abs.max(d);
                let m = x.abs().max(y.abs());
                if m > 0.0 {
                    out.max_rel = out.max_rel.max(d / m);
                }
            }
            tol.beyond(x, y)
        }
        (Value::Array(xs), Value::Array(ys)) if xs.len() == ys.len() => {
            let mut any = false;
            for (x, y) in xs.iter().zip(ys) {
                any |= compare(x, y, tol, out);
            }
            any
        }
        (x, y) => x != y,
    }
}

/// Compares output `a` with output `b` (each: key → the newest record of it).
pub fn diff(a: &BTreeMap<Key, Value>, b: &BTreeMap<Key, Value>, tol: Tolerance) -> Report {
    let mut r = Report {
        records_a: a.len() as u64,
        records_b: b.len() as u64,
        ..Report::default()
    };
    for k in a.keys() {
        if !b.contains_key(k) {
            r.only_in_a += 1;
            if r.examples_only_in_a.len() < EXAMPLES {
                r.examples_only_in_a.push(k.clone());
            }
        }
    }
    for (k, vb) in b {
        let Some(va) = a.get(k) else {
            r.only_in_b += 1;
            if r.examples_only_in_b.len() < EXAMPLES {
                r.examples_only_in_b.push(k.clone());
            }
            continue;
        };
        r.in_both += 1;
        let names: BTreeSet<&String> = va
            .as_object()
            .into_iter()
            .chain(vb.as_object())
            .flat_map(|o| o.keys())
            .filter(|n| !IDENTITY.contains(&n.as_str()))
            .collect();
        let mut changed = false;
        for name in names {
            let fa = va.get(name.as_str()).unwrap_or(&Value::Null);
            let fb = vb.get(name.as_str()).unwrap_or(&Value::Null);
            let f = r.fields.entry(name.clone()).or_default();
            if compare(fa, fb, &tol, f) {
                f.changed += 1;
                changed = true;
            }
        }
        if changed {
            r.changed += 1;
            if r.examples_changed.len() < EXAMPLES {
                r.examples_changed.push(k.clone());
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(window: i64, alpha: f64, psd: [f64; 2]) -> (Key, Value) {
        let v = json!({"session_id": "s", "channel_index": 0, "window_index": window,
                       "abs_alpha": alpha, "psd": psd, "algorithm_version": "1"});
        (key(&v).unwrap(), v)
    }

    #[test]
    fn identical_outputs_do_not_differ_and_changes_are_counted_per_field() {
        let tol = Tolerance {
            absolute: 1e-12,
            relative: 1e-6,
        };
        let a: BTreeMap<_, _> = [rec(0, 1.0, [1.0, 2.0]), rec(1, 2.0, [1.0, 2.0])].into();
        let same = diff(&a, &a.clone(), tol);
        assert!(!same.differs());
        assert_eq!(same.in_both, 2);

        // Window 1's alpha moves by 1e-7 relative (inside), its psd by 1e-3 (beyond);
        // window 0 is only in a, window 2 only in b.
        let b: BTreeMap<_, _> = [
            rec(1, 2.0 * (1.0 + 1e-7), [1.001, 2.0]),
            rec(2, 1.0, [0.0, 0.0]),
        ]
        .into();
        let r = diff(&a, &b, tol);
        assert!(r.differs());
        assert_eq!(
            (r.only_in_a, r.only_in_b, r.in_both, r.changed),
            (1, 1, 1, 1)
        );
        assert_eq!(r.fields["abs_alpha"].changed, 0);
        assert!((r.fields["abs_alpha"].max_rel - 1e-7).abs() < 1e-12);
        assert_eq!(r.fields["psd"].changed, 1);
        assert!((r.fields["psd"].max_abs - 1e-3).abs() < 1e-12);
        assert_eq!(r.examples_only_in_a, [("s".to_owned(), 0, 0)]);
    }
}

//! Every channel-window of the reference recording against the reference values
//! computed with numpy/scipy (shared/data): scalars to 1e-6 relative, PSD bins with the
//! tolerance the reference gives, peak alpha exactly.

use std::path::PathBuf;

use clisonix_edf::Reader;
use clisonix_signal::{FeatureEngine, WindowFeatures, BANDS};
use serde_json::Value;

fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// The recording's channels in physical units (f64), and the reference JSON.
fn load() -> (Vec<Vec<f64>>, Value) {
    let dir = data_dir();
    let file = std::fs::File::open(dir.join("eeglab_sample_32ch_128hz_238s.edf"))
        .expect("the reference recording (set CLISONIX_DATA_DIR)");
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let mut channels = vec![Vec::new(); header.data_signals().len()];
    while let Some(record) = reader.next_record().unwrap() {
        for (k, channel) in channels.iter_mut().enumerate() {
            channel.extend(record.physical(&header, k));
        }
    }
    let json =
        std::fs::read_to_string(dir.join("eeglab_sample_32ch_128hz_238s.reference.json")).unwrap();
    (channels, serde_json::from_str(&json).unwrap())
}

fn scalars(f: &WindowFeatures) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    for (b, (name, _, _)) in BANDS.iter().enumerate() {
        out.push((format!("abs_{name}"), f.abs[b]));
        out.push((format!("rel_{name}"), f.rel[b]));
    }
    out.push(("total_abs".into(), f.total_abs));
    out.push(("peak_alpha_psd".into(), f.peak_alpha_psd));
    out.push(("spectral_entropy".into(), f.spectral_entropy));
    out.push(("hjorth_activity".into(), f.hjorth_activity));
    out.push(("hjorth_mobility".into(), f.hjorth_mobility));
    out.push(("hjorth_complexity".into(), f.hjorth_complexity));
    out
}

/// Compares every reference window; returns the worst relative error of the scalars.
fn check_all(channels: &[Vec<f64>], reference: &Value, round_to_f32: bool, check_psd: bool) -> f64 {
    let fs = reference["fs_hz"].as_f64().unwrap();
    let n = reference["window_samples"].as_u64().unwrap() as usize;
    let mut engine = FeatureEngine::new(fs, n).unwrap();
    let mut out = WindowFeatures::default();
    let mut worst: f64 = 0.0;
    let windows = reference["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 320);
    let mut x = vec![0.0; n];
    for w in windows {
        let c = w["channel"].as_u64().unwrap() as usize;
        let start = w["start_sample"].as_u64().unwrap() as usize;
        for (dst, &src) in x.iter_mut().zip(&channels[c][start..start + n]) {
            *dst = if round_to_f32 {
                f64::from(src as f32)
            } else {
                src
            };
        }
        engine.compute(&x, &mut out).unwrap();
        let at = format!("channel {c} window {}", w["window"]);
        assert_eq!(
            out.peak_alpha_hz,
            w["peak_alpha_hz"].as_f64(),
            "{at}: peak alpha"
        );
        for (name, got) in scalars(&out) {
            let want = w[name.as_str()].as_f64().unwrap();
            let got = got.unwrap_or_else(|| panic!("{at}: {name} is undefined"));
            let rel = (got - want).abs() / want.abs();
            assert!(
                rel <= 1e-6,
                "{at}: {name} = {got}, reference {want} (rel {rel:e})"
            );
            worst = worst.max(rel);
        }
        if check_psd {
            let psd: Vec<f64> = w["psd"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(out.psd.len(), psd.len());
            let max = psd.iter().cloned().fold(0.0, f64::max);
            for (k, (&got, &want)) in out.psd.iter().zip(&psd).enumerate() {
                let tolerance = 1e-6 * want.abs() + 1e-12 * max;
                assert!(
                    (got - want).abs() <= tolerance,
                    "{at}: psd[{k}] = {got}, reference {want}"
                );
            }
        }
    }
    worst
}

#[test]
fn every_channel_window_matches_the_reference() {
    let (channels, reference) = load();
    let worst = check_all(&channels, &reference, false, true);
    eprintln!("f64 samples: worst relative error of a scalar feature {worst:e}");
    assert!(
        worst < 1e-12,
        "f64 features agree with scipy to round-off: {worst:e}"
    );
}

#[test]
fn features_of_f32_frames_stay_within_the_tolerance() {
    // Frames carry samples as f32: the features computed from them must still match.
    let (channels, reference) = load();
    let worst = check_all(&channels, &reference, true, false);
    eprintln!("f32 samples: worst relative error of a scalar feature {worst:e}");
    assert!(worst > 0.0 && worst < 5e-7, "{worst:e}");
}

//! `clisonix-topics export` against the real broker (`./dev test`): the reference
//! recording streamed as a session comes back as EDF+ and BDF+ that pyedflib (an
//! independent reader, from PyPI) reads as the original samples within the stated
//! error and the original annotations; the BIDS export passes the BIDS validator; a
//! session whose frames are gone says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_schemas::{encode, examples, DeviceId, Frame, SessionId, TenantId, Timestamp};
use clisonix_topics::{Admin, KafkaSettings, Replication, Topics};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

fn settings() -> KafkaSettings {
    KafkaSettings::new(
        std::env::var("CLISONIX_KAFKA_BOOTSTRAP")
            .expect("CLISONIX_KAFKA_BOOTSTRAP is not set: run the tests with ./dev test"),
        "export-test",
    )
}

fn python() -> PathBuf {
    PathBuf::from(std::env::var("CLISONIX_PYTHON").expect(
        "CLISONIX_PYTHON names the tests' Python environment: run the tests with ./dev test",
    ))
}

fn original() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
        .join("eeglab_sample_32ch_128hz_238s.edf")
}

fn run(prefix: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_clisonix-topics"))
        .args(["--bootstrap", &settings().bootstrap, "--prefix", prefix])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The reference recording as 1/8 s frames of one session, starting at `start_us`.
fn recording(tenant: TenantId, session: SessionId, start_us: i64) -> Vec<Frame> {
    let file = std::fs::File::open(original()).unwrap();
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: tenant,
        device_id: DeviceId::parse("cap-07").unwrap(),
        session_id: session,
        samples_per_frame: 16,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut out = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(&r, Timestamp::from_micros(start_us), &mut out);
    }
    out
}

fn check(exported: &Path) -> Value {
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/python/edf_check.py"
        ))
        .arg(exported)
        .arg(original())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn sessions_come_out_as_edf_bdf_and_bids_that_other_tools_read() {
    let prefix = format!(
        "export-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let topics = Topics::new(&prefix);
    Admin::connect(&settings())
        .unwrap()
        .ensure(&topics, Replication::Auto)
        .unwrap();
    let tenant = TenantId::random();
    let session = SessionId::random();
    let start_us = 1_765_000_000_000_000;
    let frames = recording(tenant, session, start_us);
    assert_eq!(frames.len(), 1904);
    let producer: BaseProducer = settings().producer().create().unwrap();
    let frames_topic = topics.name(&clisonix_topics::catalog::EEG_FRAMES);
    for f in &frames {
        let (k, v) = (encode(&f.key()).unwrap(), encode(f).unwrap());
        loop {
            match producer.send(BaseRecord::to(&frames_topic).key(&k).payload(&v)) {
                Ok(()) => break,
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    // Its state, and the state of a session whose frames are gone.
    let sessions_topic = topics.name(&clisonix_topics::catalog::EEG_SESSIONS);
    let gone = SessionId::random();
    for (s, seed) in [(session, 1), (gone, 2)] {
        let mut state = examples::session_state(seed);
        state.tenant_id = tenant;
        state.session_id = s;
        state.device_id = DeviceId::parse("cap-07").unwrap();
        state.started_at =
            Timestamp::from_micros(chrono::Utc::now().timestamp_micros() - 60_000_000);
        let (k, v) = (encode(&state.key()).unwrap(), encode(&state).unwrap());
        producer
            .send(BaseRecord::to(&sessions_topic).key(&k).payload(&v))
            .unwrap();
    }
    // Ten windows of features of the session's first channel.
    let features_topic = topics.name(&clisonix_topics::catalog::EEG_FEATURES);
    let mut totals = Vec::new();
    for w in 0..10u64 {
        let mut f = examples::features(w);
        f.tenant_id = tenant;
        f.session_id = session;
        f.channel_index = 0;
        f.window_index = w;
        f.total_abs = Some(100.0 + w as f64 / 4.0);
        totals.push(f.total_abs.unwrap());
        let (k, v) = (encode(&f.key()).unwrap(), encode(&f).unwrap());
        producer
            .send(BaseRecord::to(&features_topic).key(&k).payload(&v))
            .unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let dir = std::env::temp_dir().join(format!("{prefix}out"));
    let _ = std::fs::remove_dir_all(&dir);

    for format in ["edf", "bdf"] {
        let out_dir = dir.join(format);
        let (code, out, err) = run(
            &prefix,
            &[
                "export",
                "--session",
                &session.to_string(),
                "--out",
                out_dir.to_str().unwrap(),
                "--format",
                format,
                "--json",
            ],
        );
        assert_eq!(code, 0, "{err}");
        let e: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(e["frames"], 1904);
        assert_eq!(e["seconds"], 238.0);
        let file = PathBuf::from(e["file"].as_str().unwrap());
        let v = check(&file);
        assert_eq!(v["channels"], 32);
        assert_eq!(v["sample_rate"], 128.0);
        assert_eq!(v["samples"], 238 * 128);
        // Every sample within the stated error (and the f32 frames' rounding).
        for (c, d) in v["max_diff"].as_array().unwrap().iter().enumerate() {
            let stated = e["max_error"][c].as_f64().unwrap();
            let d = d.as_f64().unwrap();
            assert!(d <= stated + 1e-4, "{format} channel {c}: {d} > {stated}");
        }
        if format == "bdf" {
            assert!(
                e["max_error"][0].as_f64().unwrap() < 1e-3,
                "24 bits: {}",
                e["max_error"][0]
            );
        }
        // The original annotations, at their samples.
        let got = v["annotations"].as_array().unwrap();
        let want = v["original_annotations"].as_array().unwrap();
        let got: Vec<&Value> = got.iter().filter(|a| a[2] != "clisonix.end").collect();
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g[2], w[2]);
            let (go, wo) = (g[0].as_f64().unwrap(), w[0].as_f64().unwrap());
            assert!((go - wo).abs() <= 1.0 / 128.0 + 1e-6, "{go} vs {wo}");
        }
    }

    // Features as Parquet, read by pyarrow.
    let (code, out, err) = run(
        &prefix,
        &[
            "export",
            "--session",
            &session.to_string(),
            "--out",
            dir.join("pq").to_str().unwrap(),
            "--features",
            "parquet",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let e: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(e["features"], 10);
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/python/parquet_check.py"
        ))
        .arg(e["features_file"].as_str().unwrap())
        .arg("total_abs")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"], 10);
    assert_eq!(v["values"], serde_json::json!(totals));
    let columns = v["columns"].as_array().unwrap();
    assert!(
        columns.contains(&serde_json::json!("session_id"))
            && columns.contains(&serde_json::json!("psd_0")),
        "{columns:?}"
    );

    // EDF's 16 bits cannot hold these channels to a thousandth of a microvolt.
    let (code, _, err) = run(
        &prefix,
        &[
            "export",
            "--session",
            &session.to_string(),
            "--out",
            dir.join("fine").to_str().unwrap(),
            "--max-error",
            "0.001",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("use --format bdf"), "{err}");
    assert!(!dir.join("fine").join(format!("{session}.edf")).exists());

    // A BIDS dataset of the tenant's sessions that the validator passes.
    let bids = dir.join("bids");
    let (code, _, err) = run(
        &prefix,
        &[
            "export",
            "--session",
            &session.to_string(),
            "--bids",
            "--out",
            bids.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(bids
        .join("sub-cap07/eeg/sub-cap07_task-clisonix_run-1_eeg.edf")
        .exists());
    let events = std::fs::read_to_string(
        bids.join("sub-cap07/eeg/sub-cap07_task-clisonix_run-1_events.tsv"),
    )
    .unwrap();
    assert_eq!(events.lines().count(), 1 + 154, "{events}");
    let validator = python().parent().unwrap().join("bids-validator-deno");
    let out = Command::new(validator)
        .arg(&bids)
        .args(["--format", "json"])
        .env("DENO_NO_UPDATE_CHECK", "1")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let errors: Vec<&Value> = report["issues"]["issues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["severity"] == "error")
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");

    // A session whose frames are gone says so.
    let (code, _, err) = run(
        &prefix,
        &[
            "export",
            "--session",
            &gone.to_string(),
            "--out",
            dir.join("gone").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("eeg.frames keeps 7 days") && err.contains("none of its frames are left"),
        "{err}"
    );
    let (code, _, err) = run(
        &prefix,
        &[
            "export",
            "--session",
            &uuid::Uuid::new_v4().to_string(),
            "--out",
            dir.join("x").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("is in neither eeg.sessions nor eeg.frames"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

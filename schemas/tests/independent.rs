//! Clisonix's Avro checked against fastavro, an independent implementation (from PyPI,
//! in the tests' Python environment, `CLISONIX_PYTHON`, which `./dev test` makes):
//! every schema's Parsing Canonical Form fingerprint is fastavro's, and a record of
//! every family, as Clisonix writes it to the topics, is found by its fingerprint and
//! decoded by fastavro.

use std::io::Write;
use std::process::{Command, Stdio};

use clisonix_schemas::examples;
use clisonix_schemas::*;
use serde_json::{json, Value};

fn python() -> String {
    std::env::var("CLISONIX_PYTHON").expect(
        "CLISONIX_PYTHON names the tests' Python environment: run the tests with ./dev test, \
         or ./dev python and eval \"$(./dev env)\"",
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn fastavro_finds_every_schema_by_its_fingerprint_and_reads_every_record() {
    let mut schemas = Vec::new();
    for family in Family::ALL {
        for v in family.versions() {
            schemas.push(json!({
                "name": format!("{}/v{}", family.dir(), v.version),
                "source": v.source,
                "fingerprint": hex(&v.fingerprint.to_le_bytes()),
            }));
        }
    }
    let frame = examples::frame(3, 4, 16);
    let key = SessionKey {
        tenant_id: frame.tenant_id,
        session_id: frame.session_id,
    };
    let records = [
        ("frame", encode(&frame).unwrap()),
        ("session_key", encode(&key).unwrap()),
        ("features", encode(&examples::features(3)).unwrap()),
        ("audio_chunk", encode(&examples::audio_chunk(3)).unwrap()),
        (
            "session_state",
            encode(&examples::session_state(3)).unwrap(),
        ),
        ("usage_event", encode(&examples::usage_event(3)).unwrap()),
        ("dead_letter", encode(&examples::dead_letter(3)).unwrap()),
    ];
    let input = json!({
        "schemas": schemas,
        "records": records.iter().map(|(n, b)| json!({"name": n, "hex": hex(b)})).collect::<Vec<_>>(),
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/avro_check.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["mismatches"], json!([]), "{result}");
    let decoded = result["decoded"].as_array().unwrap();
    assert_eq!(decoded.len(), records.len());
    let got = &decoded[0]["value"];
    assert_eq!(got["session_id"], frame.session_id.to_string());
    assert_eq!(got["seq"], json!(frame.seq));
    assert_eq!(got["channel_labels"], json!(frame.channel_labels));
    assert_eq!(decoded[1]["value"]["tenant_id"], key.tenant_id.to_string());
}

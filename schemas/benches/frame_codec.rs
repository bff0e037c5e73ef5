//! Frame encode/decode throughput, and the measurement behind the `samples` layout:
//! the contract's little-endian f32 `bytes` block against the obvious alternative, an
//! Avro `array<float>` (one tagged value per sample). Prints MB/s of sample payload.
//!
//! Run: `cargo bench -p clisonix-schemas --bench frame_codec`

use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, Instant};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use clisonix_schemas::{decode, encode_into, examples, Frame};

const ALT_SCHEMA: &str = r#"{"type": "record", "name": "EegFrameFloats", "fields": [
  {"name": "session_id", "type": "string"},
  {"name": "seq", "type": "long"},
  {"name": "channel_labels", "type": {"type": "array", "items": "string"}},
  {"name": "samples", "type": {"type": "array", "items": {"type": "array", "items": "float"}}}
]}"#;

/// Runs `f` repeatedly for about `budget` and returns the mean time per call.
fn time<F: FnMut()>(budget: Duration, mut f: F) -> Duration {
    for _ in 0..50 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    start.elapsed() / n
}

fn mbps(bytes: usize, per_call: Duration) -> f64 {
    bytes as f64 / per_call.as_secs_f64() / 1e6
}

fn main() {
    let budget = Duration::from_millis(700);
    println!("frame codec: MB/s of sample payload (f32), higher is better");
    println!(
        "{:<40} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "frame", "payload B", "encode MB/s", "decode MB/s", "enc us/frm", "dec us/frm"
    );
    for (channels, n, what) in [
        (32usize, 32u32, "32 ch x 1/8 s @ 256 Hz"),
        (32, 256, "32 ch x 1 s @ 256 Hz"),
        (8, 16, "8 ch x 1/16 s @ 256 Hz"),
    ] {
        let frame = examples::frame(1, channels, n);
        let payload = frame.samples.len() * 4;

        // The contract: bytes block.
        let mut buf = Vec::with_capacity(payload + 1024);
        let enc = time(budget, || {
            buf.clear();
            encode_into(black_box(&frame), &mut buf).unwrap();
        });
        let bytes = buf.clone();
        let dec = time(budget, || {
            black_box(decode::<Frame>(black_box(&bytes)).unwrap());
        });
        println!(
            "{:<40} {:>10} {:>12.0} {:>12.0} {:>12.2} {:>12.2}",
            format!("{what} (bytes)"),
            payload,
            mbps(payload, enc),
            mbps(payload, dec),
            enc.as_secs_f64() * 1e6,
            dec.as_secs_f64() * 1e6
        );

        // The alternative: nested arrays of floats.
        let schema = Schema::parse_str(ALT_SCHEMA).unwrap();
        let writer = GenericDatumWriter::builder(&schema).build().unwrap();
        let reader = GenericDatumReader::builder(&schema).build().unwrap();
        let to_value = |f: &Frame| {
            Value::Record(vec![
                ("session_id".into(), Value::String(f.session_id.to_string())),
                ("seq".into(), Value::Long(f.seq as i64)),
                (
                    "channel_labels".into(),
                    Value::Array(
                        f.channel_labels
                            .iter()
                            .cloned()
                            .map(Value::String)
                            .collect(),
                    ),
                ),
                (
                    "samples".into(),
                    Value::Array(
                        (0..f.channel_count())
                            .map(|c| {
                                Value::Array(
                                    f.channel(c).iter().map(|&x| Value::Float(x)).collect(),
                                )
                            })
                            .collect(),
                    ),
                ),
            ])
        };
        let mut alt = Vec::new();
        let enc = time(budget, || {
            alt.clear();
            writer
                .write_value_ref(&mut alt, &to_value(black_box(&frame)))
                .unwrap();
        });
        let dec = time(budget, || {
            let value = reader
                .read_value(&mut Cursor::new(black_box(&alt)))
                .unwrap();
            let Value::Record(fields) = value else {
                unreachable!()
            };
            let Value::Array(chans) = &fields[3].1 else {
                unreachable!()
            };
            let samples: Vec<f32> = chans
                .iter()
                .flat_map(|c| match c {
                    Value::Array(xs) => xs
                        .iter()
                        .map(|x| match x {
                            Value::Float(v) => *v,
                            _ => unreachable!(),
                        })
                        .collect::<Vec<_>>(),
                    _ => unreachable!(),
                })
                .collect();
            black_box(samples);
        });
        println!(
            "{:<40} {:>10} {:>12.0} {:>12.0} {:>12.2} {:>12.2}",
            format!("{what} (array<float>)"),
            payload,
            mbps(payload, enc),
            mbps(payload, dec),
            enc.as_secs_f64() * 1e6,
            dec.as_secs_f64() * 1e6
        );
    }
}

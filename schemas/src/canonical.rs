//! The Avro specification's Parsing Canonical Form of a schema and its CRC-64-AVRO
//! fingerprint, written from the specification ("Parsing Canonical Form for Schemas",
//! "Schema Fingerprints"), from the schema's JSON text.
//!
//! This is what single-object encoding puts in a record's header, and what other
//! Avro implementations (Java's `SchemaNormalization`, fastavro, avro-python) compute.
//! apache-avro 0.22's own canonical form keeps a logical type's primitive as an object
//! (`{"type":"long"}` where the specification writes `"long"`), so its fingerprint of a
//! schema with a logical type differs: records written before this module carry that
//! one, and the registry reads both ([`crate::SchemaVersion::legacy_fingerprint`]).

use std::collections::HashSet;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    #[error("the schema is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a schema at {at}: {what}")]
    Invalid { at: String, what: String },
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// The Parsing Canonical Form of the schema in `json`.
pub fn parsing_canonical_form(json: &str) -> Result<String, CanonicalError> {
    let value: Value = serde_json::from_str(json)?;
    let mut out = String::with_capacity(json.len() / 2);
    let mut defined = HashSet::new();
    canonical(&value, None, &mut defined, &mut out, "$")?;
    Ok(out)
}

/// CRC-64-AVRO ("Rabin") of `data`, as the specification writes it.
pub fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: std::sync::LazyLock<[u64; 256]> = std::sync::LazyLock::new(|| {
        let mut table = [0u64; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *entry = fp;
        }
        table
    });
    let mut fp = EMPTY;
    for &b in data {
        fp = (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

/// The specification's fingerprint of the schema in `json`: CRC-64-AVRO of its
/// Parsing Canonical Form.
pub fn fingerprint(json: &str) -> Result<u64, CanonicalError> {
    Ok(crc64_avro(parsing_canonical_form(json)?.as_bytes()))
}

fn invalid(at: &str, what: impl Into<String>) -> CanonicalError {
    CanonicalError::Invalid {
        at: at.to_owned(),
        what: what.into(),
    }
}

fn quote(s: &str, out: &mut String) {
    // [STRINGS]: the text itself, escaping only what JSON must.
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// [FULLNAMES]: a name and the namespace it is in, as (fullname, its namespace).
fn full_name(name: &str, namespace: Option<&str>) -> (String, Option<String>) {
    if let Some((ns, _)) = name.rsplit_once('.') {
        (name.to_owned(), Some(ns.to_owned()))
    } else {
        match namespace.filter(|ns| !ns.is_empty()) {
            Some(ns) => (format!("{ns}.{name}"), Some(ns.to_owned())),
            None => (name.to_owned(), None),
        }
    }
}

fn canonical(
    v: &Value,
    namespace: Option<&str>,
    defined: &mut HashSet<String>,
    out: &mut String,
    at: &str,
) -> Result<(), CanonicalError> {
    match v {
        // [PRIMITIVES] as their name; a named type by its full name.
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                quote(name, out);
            } else {
                quote(&full_name(name, namespace).0, out);
            }
            Ok(())
        }
        // A union: its branches in order.
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(b, namespace, defined, out, &format!("{at}[{i}]"))?;
            }
            out.push(']');
            Ok(())
        }
        Value::Object(o) => {
            let kind = o.get("type").ok_or_else(|| invalid(at, "no \"type\""))?;
            let kind = match kind {
                Value::String(k) => k.as_str(),
                // `{"type": <schema>}` is that schema.
                other => return canonical(other, namespace, defined, out, &format!("{at}.type")),
            };
            if PRIMITIVES.contains(&kind) {
                // [STRIP]: a logical type's annotations go; the primitive stays.
                quote(kind, out);
                return Ok(());
            }
            match kind {
                "record" | "error" | "enum" | "fixed" => {
                    let name = o
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| invalid(at, format!("a {kind} without a name")))?;
                    let own_ns = o.get("namespace").and_then(Value::as_str).or(namespace);
                    let (full, ns) = full_name(name, own_ns);
                    if !defined.insert(full.clone()) {
                        // Defined already: referred to by name.
                        quote(&full, out);
                        return Ok(());
                    }
                    // [ORDER]: name, type, fields, symbols, items, values, size.
                    out.push_str("{\"name\":");
                    quote(&full, out);
                    out.push_str(",\"type\":");
                    quote(if kind == "error" { "error" } else { kind }, out);
                    match kind {
                        "enum" => {
                            let symbols = o
                                .get("symbols")
                                .and_then(Value::as_array)
                                .ok_or_else(|| invalid(at, "an enum without symbols"))?;
                            out.push_str(",\"symbols\":[");
                            for (i, s) in symbols.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let s = s
                                    .as_str()
                                    .ok_or_else(|| invalid(at, "a symbol is not a string"))?;
                                quote(s, out);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = o
                                .get("size")
                                .and_then(Value::as_u64)
                                .ok_or_else(|| invalid(at, "a fixed without a size"))?;
                            // [INTEGERS]: no leading zeros, as a number prints.
                            out.push_str(&format!(",\"size\":{size}"));
                        }
                        _ => {
                            let fields = o
                                .get("fields")
                                .and_then(Value::as_array)
                                .ok_or_else(|| invalid(at, "a record without fields"))?;
                            out.push_str(",\"fields\":[");
                            for (i, f) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname = f
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| invalid(at, "a field without a name"))?;
                                let ftype = f
                                    .get("type")
                                    .ok_or_else(|| invalid(at, "a field without a type"))?;
                                out.push_str("{\"name\":");
                                quote(fname, out);
                                out.push_str(",\"type\":");
                                canonical(
                                    ftype,
                                    ns.as_deref(),
                                    defined,
                                    out,
                                    &format!("{at}.{fname}"),
                                )?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                    Ok(())
                }
                "array" => {
                    let items = o
                        .get("items")
                        .ok_or_else(|| invalid(at, "an array without items"))?;
                    out.push_str("{\"type\":\"array\",\"items\":");
                    canonical(items, namespace, defined, out, &format!("{at}.items"))?;
                    out.push('}');
                    Ok(())
                }
                "map" => {
                    let values = o
                        .get("values")
                        .ok_or_else(|| invalid(at, "a map without values"))?;
                    out.push_str("{\"type\":\"map\",\"values\":");
                    canonical(values, namespace, defined, out, &format!("{at}.values"))?;
                    out.push('}');
                    Ok(())
                }
                // A reference to a named type written as {"type": "Name"}.
                name => {
                    quote(&full_name(name, namespace).0, out);
                    Ok(())
                }
            }
        }
        other => Err(invalid(at, format!("{other} is not a schema"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specifications_forms() {
        // Primitives, however written, are their name; logical types are stripped.
        for (schema, form) in [
            (r#""int""#, r#""int""#),
            (r#"{"type": "int"}"#, r#""int""#),
            (
                r#"{"type": "long", "logicalType": "timestamp-micros"}"#,
                r#""long""#,
            ),
            (
                r#"{"type": "array", "items": {"type": "string"}, "default": []}"#,
                r#"{"type":"array","items":"string"}"#,
            ),
            (
                r#"{"type": "fixed", "size": 16, "name": "md5", "namespace": "a.b", "doc": "x"}"#,
                r#"{"name":"a.b.md5","type":"fixed","size":16}"#,
            ),
            (
                r#"{"namespace": "n", "type": "record", "name": "R", "doc": "d", "fields": [
                    {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"], "default": "A"}},
                    {"name": "again", "type": "E"},
                    {"name": "u", "type": ["null", {"type": "map", "values": "long"}], "default": null}
                ]}"#,
                r#"{"name":"n.R","type":"record","fields":[{"name":"e","type":{"name":"n.E","type":"enum","symbols":["A","B"]}},{"name":"again","type":"n.E"},{"name":"u","type":["null",{"type":"map","values":"long"}]}]}"#,
            ),
        ] {
            assert_eq!(parsing_canonical_form(schema).unwrap(), form, "{schema}");
        }
    }

    #[test]
    fn fingerprints_of_the_specifications_test_vectors() {
        // From the Avro project's test data for CRC-64-AVRO (share/test/data/schema-tests.txt).
        assert_eq!(
            fingerprint(r#""null""#).unwrap() as i64,
            7195948357588979594
        );
        assert_eq!(fingerprint(r#""int""#).unwrap() as i64, 8247732601305521295);
        assert_eq!(
            fingerprint(r#""string""#).unwrap() as i64,
            -8142146995180207161
        );
    }

    #[test]
    fn a_schema_that_is_not_one_is_an_error() {
        assert!(parsing_canonical_form("{").is_err());
        assert!(parsing_canonical_form("{\"type\": \"record\", \"name\": \"R\"}").is_err());
        assert!(parsing_canonical_form("42").is_err());
    }
}

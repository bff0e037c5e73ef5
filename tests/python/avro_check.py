"""Checks Clisonix's Avro against fastavro, an independent implementation.

Reads a JSON document on stdin: {"schemas": [{"name", "source", "fingerprint"}],
"records": [{"name", "hex"}]}. For every schema, fastavro's Parsing Canonical Form and
CRC-64-AVRO fingerprint (little-endian hex, as the single-object header carries it)
must equal Clisonix's. Every record, in single-object encoding, must name by its
fingerprint a schema fastavro finds, and decode with it. Prints one JSON object:
{"mismatches": [...], "decoded": [{"name", "value"}]}.
"""

import io
import json
import sys

import fastavro
import fastavro.schema

doc = json.load(sys.stdin)
mismatches = []
by_fingerprint = {}
for s in doc["schemas"]:
    parsed = json.loads(s["source"])
    form = fastavro.schema.to_parsing_canonical_form(parsed)
    fp = fastavro.schema.fingerprint(form, "CRC-64-AVRO")
    if fp != s["fingerprint"]:
        mismatches.append(f'{s["name"]}: fastavro says {fp}, Clisonix {s["fingerprint"]}')
    by_fingerprint[fp] = fastavro.parse_schema(parsed)

decoded = []
for r in doc["records"]:
    data = bytes.fromhex(r["hex"])
    if data[:2] != b"\xc3\x01":
        mismatches.append(f'{r["name"]}: no single-object marker')
        continue
    schema = by_fingerprint.get(data[2:10].hex())
    if schema is None:
        mismatches.append(f'{r["name"]}: fingerprint {data[2:10].hex()} names no schema')
        continue
    buf = io.BytesIO(data[10:])
    value = fastavro.schemaless_reader(buf, schema)
    if buf.read():
        mismatches.append(f'{r["name"]}: bytes left after the record')
    decoded.append({"name": r["name"], "value": json.loads(json.dumps(value, default=str))})

json.dump({"mismatches": mismatches, "decoded": decoded}, sys.stdout)

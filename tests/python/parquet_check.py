"""Reads a Parquet file with pyarrow, an independent implementation, and prints its
row count, column names and the named column's values as JSON.

Usage: parquet_check.py FILE COLUMN [COLUMN...]: the first column's values as
`values`, every named column's in `named`, and each column's type in `types`.
"""

import json
import sys

import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1])
json.dump(
    {
        "rows": table.num_rows,
        "columns": table.column_names,
        "values": table.column(sys.argv[2]).to_pylist(),
        "named": {name: table.column(name).to_pylist() for name in sys.argv[2:]},
        "types": {field.name: str(field.type) for field in table.schema},
    },
    sys.stdout,
    default=str,
)

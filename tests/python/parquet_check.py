"""Reads a Parquet file with pyarrow, an independent implementation, and prints its
row count, column names and the named column's values as JSON.

Usage: parquet_check.py FILE COLUMN
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
    },
    sys.stdout,
)

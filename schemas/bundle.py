"""The shard bundle: every user's delta of one shard, one Parquet object (zstd).

One row per user, sorted by ``user_id``; a row holds the delta's ``layers`` and ``row_ids`` as
lists and its float16 values as one little-endian byte string (``Delta.value_bytes()``), so a
serving node rebuilds a Delta without copying per value and DuckDB can still query the rest.
``cobatch_group`` (version 2) numbers the user's co-batch group within the shard: users of one
group write pairwise disjoint rows, so a serving node that writes deltas into a shared table may
apply a whole group at once (null: not computed, e.g. a bundle built outside the nightly job).
The schema version lives in the Parquet schema metadata; readers refuse other versions.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engram_core.delta import Delta

BUNDLE_SCHEMA_VERSION = 2
_VERSION_KEY = b"engram.bundle_schema_version"

BUNDLE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("num_facts", pa.int32(), nullable=False),
        pa.field("layers", pa.list_(pa.int16()), nullable=False),
        pa.field("row_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("values", pa.binary(), nullable=False),
        pa.field("width", pa.int16(), nullable=False),
        pa.field("cobatch_group", pa.int32(), nullable=True),
    ],
    metadata={_VERSION_KEY: str(BUNDLE_SCHEMA_VERSION).encode()},
)


class BundleSchemaError(ValueError):
    pass


def bundle_table(deltas: dict[str, tuple[Delta, int]], groups: list[list[str]] | None = None) -> pa.Table:
    """user_id -> (delta, num_facts) as a bundle table sorted by user_id; ``groups`` (co-batch
    groups of these users, e.g. from ``pipeline.collisions``) fill the ``cobatch_group`` column."""
    users = sorted(deltas)
    layer_lists, row_lists, value_bytes, widths, num_facts = [], [], [], [], []
    for user in users:
        delta, facts = deltas[user]
        if not user:
            raise BundleSchemaError("bundle: empty user_id")
        layer_lists.append(delta.layers)
        row_lists.append(delta.row_ids)
        value_bytes.append(delta.value_bytes())
        widths.append(delta.width)
        num_facts.append(int(facts))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in row_lists], dtype=np.int64)]).astype(np.int32)

    def lists(chunks: list[np.ndarray], dtype) -> pa.Array:
        flat = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    columns = [
        pa.array(users, pa.string()),
        pa.array(num_facts, pa.int32()),
        lists(layer_lists, np.int16),
        lists(row_lists, np.int64),
        pa.array(value_bytes, pa.binary()),
        pa.array(widths, pa.int16()),
        pa.array(_group_numbers(users, groups), pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=BUNDLE_SCHEMA)


def _group_numbers(users: list[str], groups: list[list[str]] | None) -> list[int | None]:
    if groups is None:
        return [None] * len(users)
    number = {u: g for g, members in enumerate(groups) for u in members}
    missing = [u for u in users if u not in number]
    if missing:
        raise BundleSchemaError(f"bundle: users {missing[:5]} are in no co-batch group")
    return [number[u] for u in users]


def encode_bundle(table: pa.Table) -> bytes:
    """Parquet (zstd) bytes; the same table always gives the same bytes (no timestamps are written)."""
    validate_bundle_table(table, source="bundle to encode")
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=3, write_statistics=True,
                   use_dictionary=False, row_group_size=max(len(table), 1))
    return sink.getvalue()


def decode_bundle(data: bytes, *, source: str = "bundle") -> pa.Table:
    """Parse and validate a bundle; ``source`` (e.g. the object key) names it in errors."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleSchemaError(f"{source}: not a readable Parquet bundle ({e})") from None
    validate_bundle_table(table, source=source)
    return table


def validate_bundle_table(table: pa.Table, *, source: str = "bundle") -> None:
    version = (table.schema.metadata or {}).get(_VERSION_KEY)
    if version is None:
        raise BundleSchemaError(f"{source}: missing bundle schema version (metadata {_VERSION_KEY.decode()!r})")
    if version != str(BUNDLE_SCHEMA_VERSION).encode():
        raise BundleSchemaError(f"{source}: bundle schema version {version.decode()} is not supported "
                                f"(this engram reads version {BUNDLE_SCHEMA_VERSION})")
    for expected in BUNDLE_SCHEMA:
        if expected.name not in table.schema.names:
            raise BundleSchemaError(f"{source}: missing column {expected.name!r}")
        actual = table.schema.field(expected.name)
        if actual.type != expected.type:
            raise BundleSchemaError(f"{source}: column {expected.name!r} is {actual.type}, expected {expected.type}")
    if table.schema.names != BUNDLE_SCHEMA.names:
        raise BundleSchemaError(f"{source}: columns {table.schema.names}, expected {BUNDLE_SCHEMA.names}")
    users = table.column("user_id")
    if users.null_count or (len(users) and pc.min(pc.utf8_length(users)).as_py() == 0):
        raise BundleSchemaError(f"{source}: null or empty user_id")
    if len(users) > 1:
        ids = users.to_pylist()
        if any(a >= b for a, b in zip(ids, ids[1:])):
            raise BundleSchemaError(f"{source}: user_id must be unique and sorted")


def bundle_deltas(table: pa.Table) -> dict[str, Delta]:
    """A bundle table back to user_id -> Delta (bit-exact)."""
    table = table.combine_chunks()
    layers = table.column("layers").chunk(0) if table.num_rows else None
    row_ids = table.column("row_ids").chunk(0) if table.num_rows else None
    deltas = {}
    for i, (user, values, width) in enumerate(zip(table.column("user_id").to_pylist(),
                                                  table.column("values").to_pylist(),
                                                  table.column("width").to_pylist())):
        user_layers = layers[i].values.to_numpy(zero_copy_only=False)
        user_rows = row_ids[i].values.to_numpy(zero_copy_only=False)
        deltas[user] = Delta.from_bytes(user_layers, user_rows, values, width)
    return deltas

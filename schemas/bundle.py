"""The shard bundle: every user's delta of one shard, one Parquet object (zstd).

One row per user, sorted by ``user_id``; a row holds the delta's ``layers`` and ``row_ids`` as
lists and its float16 values as one little-endian byte string (``Delta.value_bytes()``), so a
serving node rebuilds a Delta without copying per value and DuckDB can still query the rest.
``cobatch_group`` (version 2) numbers the user's co-batch group within the shard: users of one
group write pairwise disjoint rows, so a serving node that writes deltas into a shared table may
apply a whole group at once (null: not computed, e.g. a bundle built outside the nightly job).
``scope`` (version 3, nullable) names the shared scope whose delta serving composes under the
user's own (``[scope_delta, user_delta]``, pipeline.scopes): the scope's rows are not in the
user's delta. Version-2 bundles (no ``scope`` column) are still read, as rows with no scope.
The schema version lives in the Parquet schema metadata; readers refuse other versions.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engram_core.delta import Delta

BUNDLE_SCHEMA_VERSION = 3
READABLE_BUNDLE_VERSIONS = (2, 3)  # version 2: before shared scopes (no ``scope`` column)
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
        pa.field("scope", pa.string(), nullable=True),
    ],
    metadata={_VERSION_KEY: str(BUNDLE_SCHEMA_VERSION).encode()},
)


class BundleSchemaError(ValueError):
    pass


def bundle_table(deltas: dict[str, tuple[Delta, int]], groups: list[list[str]] | None = None,
                 scopes: dict[str, str] | None = None) -> pa.Table:
    """user_id -> (delta, num_facts) as a bundle table sorted by user_id; ``groups`` (co-batch
    groups of these users, e.g. from ``pipeline.collisions``) fill the ``cobatch_group`` column;
    ``scopes`` (user -> shared scope id composed under the user's delta) the ``scope`` column."""
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
        pa.array([(scopes or {}).get(u) for u in users], pa.string()),
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


def _read_parquet(data: bytes, source: str, what: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleSchemaError(f"{source}: not a readable Parquet {what} ({e})") from None


def decode_bundle(data: bytes, *, source: str = "bundle") -> pa.Table:
    """Parse and validate a bundle; ``source`` (e.g. the object key) names it in errors."""
    table = _upgrade(_read_parquet(data, source, "bundle"), BUNDLE_SCHEMA.metadata)
    validate_bundle_table(table, source=source)
    return table


def _upgrade(table: pa.Table, metadata: dict) -> pa.Table:
    """A version-2 bundle (or version-1 layer) read as the current version: a null ``scope``
    column is added (no shared scope), the other metadata (a layer's fingerprint, parent) kept."""
    old = table.schema.metadata or {}
    version_key = _VERSION_KEY if _VERSION_KEY in metadata else _LAYER_VERSION_KEY
    if old.get(version_key) != (b"2" if version_key == _VERSION_KEY else b"1") or "scope" in table.schema.names:
        return table
    at = table.schema.get_field_index("cobatch_group") + 1 if "cobatch_group" in table.schema.names else table.num_columns
    table = table.add_column(at, BUNDLE_SCHEMA.field("scope"), pa.nulls(table.num_rows, pa.string()))
    return table.replace_schema_metadata(dict(old) | {version_key: metadata[version_key]})


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


# ---------------------------------------------------------------- layers

LAYER_SCHEMA_VERSION = 2  # 2: the bundle's ``scope`` column (version-1 layers are read with no scope)
_LAYER_VERSION_KEY = b"engram.layer_schema_version"
_FINGERPRINT_KEY = b"engram.fingerprint"
_PARENT_KEY = b"engram.parent_sha256"

# A delta layer: one night's change to a shard's deltas. Rows are the bundle's columns plus
# ``tombstone``: a tombstone row (empty delta, num_facts 0, width 0) removes the user's delta from
# the view below it; any other row replaces the user's delta whole. One row per user, sorted by
# user_id. The schema metadata names the model fingerprint the deltas were compiled for and the
# sha256 of the object the layer applies on (its parent: the base bundle or the layer below), so a
# layer put on the wrong chain, or read by a node serving another model, is refused; it also makes
# two layers of equal rows in one chain two objects.
LAYER_SCHEMA = pa.schema(
    list(BUNDLE_SCHEMA) + [pa.field("tombstone", pa.bool_(), nullable=False)],
    metadata={_LAYER_VERSION_KEY: str(LAYER_SCHEMA_VERSION).encode()},
)


def layer_table(upserts: pa.Table, tombstones: list[str] | pa.Array) -> pa.Table:
    """A layer from bundle rows (``upserts``: BUNDLE_SCHEMA, the users' whole deltas) and the users
    whose delta goes (``tombstones``); sorted by user_id. Raises BundleSchemaError for a user in both."""
    upserts = upserts.cast(BUNDLE_SCHEMA)
    gone = pa.array(sorted(set(tombstones.to_pylist() if isinstance(tombstones, (pa.Array, pa.ChunkedArray))
                                   else tombstones)), pa.string())
    both = pc.is_in(upserts.column("user_id"), gone)
    if len(gone) and pc.any(both).as_py():
        raise BundleSchemaError(f"layer: users {pc.filter(upserts.column('user_id'), both).to_pylist()[:5]} "
                                "are both upserted and removed")
    n = len(gone)
    removed = pa.Table.from_arrays([
        gone, pa.array([0] * n, pa.int32()),
        pa.array([[]] * n, pa.list_(pa.int16())), pa.array([[]] * n, pa.list_(pa.int64())),
        pa.array([b""] * n, pa.binary()), pa.array([0] * n, pa.int16()), pa.nulls(n, pa.int32()),
        pa.nulls(n, pa.string()),
    ], schema=BUNDLE_SCHEMA)
    table = pa.concat_tables([upserts, removed])
    flags = pa.array([False] * upserts.num_rows + [True] * n, pa.bool_())
    table = table.append_column(LAYER_SCHEMA.field("tombstone"), flags)
    return table.sort_by([("user_id", "ascending")]).replace_schema_metadata(LAYER_SCHEMA.metadata)


def encode_layer(table: pa.Table, fingerprint: str, parent_sha256: str) -> bytes:
    """Parquet (zstd) bytes of a layer for the model ``fingerprint``, applying on the object whose
    sha256 is ``parent_sha256``; the same rows, model and parent give the same bytes."""
    validate_layer_table(table, source="layer to encode")
    metadata = dict(LAYER_SCHEMA.metadata) | {_FINGERPRINT_KEY: fingerprint.encode(), _PARENT_KEY: parent_sha256.encode()}
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), sink, compression="zstd", compression_level=3,
                   write_statistics=True, use_dictionary=False, row_group_size=max(len(table), 1))
    return sink.getvalue()


def decode_layer(data: bytes, *, source: str = "layer", fingerprint: str | None = None,
                 parent_sha256: str | None = None) -> pa.Table:
    """Parse and validate a layer; ``fingerprint`` and ``parent_sha256``, if given, must be the
    model it was written for and the object it applies on."""
    table = _upgrade(_read_parquet(data, source, "layer"), LAYER_SCHEMA.metadata)
    validate_layer_table(table, source=source)
    written_for = (table.schema.metadata or {}).get(_FINGERPRINT_KEY, b"").decode()
    if fingerprint is not None and written_for != fingerprint:
        raise BundleSchemaError(f"{source}: layer written for model {written_for[:16] or '?'}.., expected "
                                f"{fingerprint[:16]}.. (refused)")
    parent = layer_parent(table)
    if parent_sha256 is not None and parent != parent_sha256:
        raise BundleSchemaError(f"{source}: layer chain broken: the layer applies on {parent[:16] or '?'}.., but the "
                                f"object below it is {parent_sha256[:16]}.. (refused)")
    return table


def layer_fingerprint(table: pa.Table) -> str:
    return (table.schema.metadata or {}).get(_FINGERPRINT_KEY, b"").decode()


def layer_parent(table: pa.Table) -> str:
    """sha256 of the object the layer applies on (the base bundle or the layer below it)."""
    return (table.schema.metadata or {}).get(_PARENT_KEY, b"").decode()


def validate_layer_table(table: pa.Table, *, source: str = "layer") -> None:
    version = (table.schema.metadata or {}).get(_LAYER_VERSION_KEY)
    if version != str(LAYER_SCHEMA_VERSION).encode():
        found = "missing" if version is None else version.decode()
        raise BundleSchemaError(f"{source}: layer schema version {found} is not supported "
                                f"(this engram reads version {LAYER_SCHEMA_VERSION})")
    if table.schema.names != LAYER_SCHEMA.names:
        raise BundleSchemaError(f"{source}: columns {table.schema.names}, expected {LAYER_SCHEMA.names}")
    for expected in LAYER_SCHEMA:
        if table.schema.field(expected.name).type != expected.type:
            raise BundleSchemaError(f"{source}: column {expected.name!r} is {table.schema.field(expected.name).type}, "
                                    f"expected {expected.type}")
    if table.num_rows == 0:
        raise BundleSchemaError(f"{source}: a layer with no rows")
    bundle_part = table.drop_columns(["tombstone"]).replace_schema_metadata(BUNDLE_SCHEMA.metadata)
    validate_bundle_table(bundle_part, source=source)
    if table.column("tombstone").null_count:
        raise BundleSchemaError(f"{source}: null in column 'tombstone'")


def layer_parts(table: pa.Table) -> tuple[pa.Table, pa.Array]:
    """(the layer's upserted rows as a bundle table, the user_ids it removes)."""
    flags = table.column("tombstone")
    upserts = table.filter(pc.invert(flags)).drop_columns(["tombstone"]).replace_schema_metadata(BUNDLE_SCHEMA.metadata)
    removed = table.filter(flags).column("user_id").combine_chunks()
    return upserts, removed


def merge_bundle_chain(base: pa.Table, layers: list[pa.Table]) -> pa.Table:
    """The merged view of a base bundle and its layers (oldest first): for each user the newest
    entry wins, a tombstone removes the user. A bundle table sorted by user_id."""
    view = base.cast(BUNDLE_SCHEMA)
    for layer in layers:
        upserts, _ = layer_parts(layer)
        if view.num_rows:
            view = view.filter(pc.invert(pc.is_in(view.column("user_id"), layer.column("user_id"))))
        view = pa.concat_tables([view, upserts.cast(BUNDLE_SCHEMA)])
    return view.sort_by([("user_id", "ascending")]).combine_chunks()


def bundle_scopes(table: pa.Table) -> dict[str, str]:
    """user_id -> shared scope id for the rows of a bundle (or a layer's upserts) that name one."""
    if "scope" not in table.column_names or table.num_rows == 0:
        return {}
    named = table.filter(pc.is_valid(table.column("scope")))
    return dict(zip(named.column("user_id").to_pylist(), named.column("scope").to_pylist()))

"""Stats: Parquet tables per version, queried with DuckDB.

A version's stats are *parts*: content-addressed Parquet objects ``stats/<table>/<sha256>.parquet``
named by its manifest. Per shard (in the shard's manifest entry): ``facts``, ``users`` and
``collisions`` of its base and of each of its layers, so a shard that did not change is carried
with its stats by reference, neither read nor rewritten, and a changed one adds parts of its
changed users only. In the ``facts`` and ``users`` views a row of a base's or layer's part is
hidden when a newer layer of its shard names its user (read from the layer objects' ``user_id``
column): each user's rows come from the newest object that holds them, as its delta does. The
shared scopes' own ``facts`` rows (``user_id`` = ``scope`` = the scope id, named by the manifest's
``scopes``) are never hidden: a layer names users, and a user may have a scope's id.
``collisions`` is the union of the parts (a layer's: rows shared among its own users). Per version (the manifest's ``stats``): ``rejects`` (this night's, one part
per shard that had events and one for files and rows that reach no shard), ``runs`` and
``shards``. Stores written before manifests named their parts (schema version 1) kept one file
per table and version under ``stats/<table>/version=<N>/``; those are read too.

:func:`query_stats` gives one view per table over every published version, with a ``version``
column taken from the manifest that names the part, never from folder names (a store may live
under any prefix, ``key=value/`` ones included). Each part is read once per query through the
store (locally and on S3 alike), checked against the sha256 its key names, and handed to DuckDB as
an in-memory dataset (no DuckDB extension is downloaded at run time: these machines reach no
internet); only the layer objects' ``user_id`` columns are read through the store's pyarrow
filesystem.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import io
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.facts import SchemaMismatch, conform
from schemas.manifest import Manifest, ShardEntry, stats_part_key
from schemas.stats import STATS_SCHEMAS, queried_schema
from versions.catalog import list_versions, read_current, read_manifest, verified_bytes
from versions.commit import write_verified_objects
from versions.errors import NOT_A_STORE_HINT, IntegrityError, UnknownVersion
from versions.store import ObjectNotFound

logger = logging.getLogger(__name__)

STATS_PREFIX = "stats"


SCOPE_STALE = "scope_stale"
"""``facts.status`` of a member's copy of a shared scope's fact in a version whose manifest names
the scope ``stale`` (a forget dropped the scope's delta: it was compiled from a forgotten member's
copies): the fact is not served in that version, whatever it compiled with."""
SCOPE_STALE_DETAIL = ("the scope's delta was dropped by a forget (compiled from a forgotten member's copies); "
                      "not served until the next night compiles the scope again")


def scope_stale_holder_detail(scopes) -> str:
    """``facts.detail`` of a fact of a user's own delta that a forget emptied (status
    :data:`SCOPE_STALE`): the user holds ``scopes`` (stale) as extra scopes, and its own delta was
    compiled with their merged facts, a forgotten member's copies among them (versions.forget)."""
    scopes = list(scopes)
    named = ", ".join(json.dumps(s, ensure_ascii=False) for s in scopes)
    held = "scope" if len(scopes) == 1 else "scopes"
    return (f"the user's own delta was dropped by a forget (compiled with the facts of {held} {named}, held as an "
            "extra scope, from a forgotten member's copies); not served until the next night compiles it again "
            "(its first scope's delta is still served)")


class StatsQueryError(RuntimeError):
    """A stats query failed; the message holds DuckDB's own."""


def stats_prefix(table: str, version: int) -> str:
    """Where a schema-version-1 store kept ``table`` of ``version`` (read only)."""
    return f"{STATS_PREFIX}/{table}/version={version}/"


OPTIONAL_COLUMNS = {"facts": ("scope", "detail")}
"""Stats columns added after their table: a table given without one gets nulls (facts.scope: the
shared scope a member's copy of a scope fact compiled in; facts.detail: the compiler's detail)."""


def encode_stats_part(name: str, table: pa.Table) -> tuple[str, bytes]:
    """(key, Parquet bytes) of one part of stats table ``name``, conformed to its schema (a
    ``version`` column, if any, is dropped: the manifest gives it). The same rows give the same
    bytes and key. Raises ValueError naming an unknown table or a missing or uncastable column."""
    if name not in STATS_SCHEMAS:
        raise ValueError(f"unknown stats tables {[name]}; known: {sorted(STATS_SCHEMAS)}")
    for column in OPTIONAL_COLUMNS.get(name, ()):  # added after the table: absent reads as null
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, STATS_SCHEMAS[name].field(column).type))
    try:
        rows = conform(table, STATS_SCHEMAS[name], f"stats table {name!r}")
    except SchemaMismatch as err:
        raise ValueError(str(err)) from err
    buffer = io.BytesIO()
    pq.write_table(rows, buffer, compression="zstd", use_dictionary=False)
    data = buffer.getvalue()
    return stats_part_key(name, hashlib.sha256(data).hexdigest()), data


def write_stats_part(store, name: str, table: pa.Table) -> str:
    """Write one part of stats table ``name`` (content-addressed, read back); returns its key."""
    key, data = encode_stats_part(name, table)
    write_verified_objects(store, {key: data})
    logger.debug("stats: wrote %s (%d rows) as %s", name, table.num_rows, key)
    return key


def shards_table(entries: list[ShardEntry], previous: Manifest | None) -> pa.Table:
    """The ``shards`` stats rows of a version: per shard its totals, base, layers (bytes and users
    of each), tombstones, state layers, and whether this version compacted it (against
    ``previous``, the version it was made from)."""
    prior = {e.shard: e for e in previous.shards} if previous is not None and previous.num_shards == len(entries) else {}

    def compacted(entry: ShardEntry) -> bool:
        before = prior.get(entry.shard)
        return before is not None and entry.compactions > before.compactions

    return pa.table({
        "shard": pa.array([e.shard for e in entries], pa.int64()),
        "users": pa.array([e.users for e in entries], pa.int64()),
        "facts": pa.array([e.facts for e in entries], pa.int64()),
        "rows": pa.array([e.rows for e in entries], pa.int64()),
        "bytes": pa.array([e.delta_bytes for e in entries], pa.int64()),
        "bundle_key": pa.array([e.bundle_key for e in entries], pa.string()),
        "base_bytes": pa.array([e.bundle_bytes for e in entries], pa.int64()),
        "layers": pa.array([len(e.layers) for e in entries], pa.int64()),
        "layer_bytes": pa.array([[layer.bytes for layer in e.layers] for e in entries], pa.list_(pa.int64())),
        "layer_users": pa.array([[layer.users for layer in e.layers] for e in entries], pa.list_(pa.int64())),
        "tombstones": pa.array([sum(layer.tombstones for layer in e.layers) for e in entries], pa.int64()),
        "state_layers": pa.array([len(e.state_layers) for e in entries], pa.int64()),
        "compactions": pa.array([e.compactions for e in entries], pa.int64()),
        "compacted": pa.array([compacted(e) for e in entries], pa.bool_()),
    })


def version_parts(store, manifest: Manifest, table: str) -> list[str]:
    """The keys of ``table``'s parts in ``manifest``'s version (a version-1 manifest's hive folder
    is listed)."""
    if manifest.schema_version == 1:
        return [k for k in store.list(stats_prefix(table, manifest.version)) if k.endswith(".parquet")]
    parts = []
    for key in manifest.stats_parts(table):
        parts += [k for k in store.list(key) if k.endswith(".parquet")] if key.endswith("/") else [key]
    return parts


def stored_in_other_case(target, users: list[str], version: int | None = None) -> dict[str, list[str]]:
    """{user given: the stored user ids (the ``users`` stats of ``version``, or of every retained
    version) that differ from it only in case}, for ids a command did not find: an erasure request
    quotes the id as the person wrote it, and the log may have kept another case; "not found" alone
    read as "nothing stored". Both sides are lower-cased by DuckDB's ``lower`` (one folding).
    Best effort: {} where the stats cannot be read (the command's own outcome stands)."""
    from engram_core.text import canonical_id

    wanted = {canonical_id(u): u for u in users}
    if not wanted:
        return {}
    listed = ", ".join("('" + u.replace("'", "''") + "')" for u in wanted)
    where = "" if version is None else f" and u.version = {int(version)}"
    try:
        rows = query_stats(target, f"select distinct w.given, u.user_id from (values {listed}) w(given) "
                                   f"join users u on lower(u.user_id) = lower(w.given) and u.user_id <> w.given{where}")
    except Exception:  # noqa: BLE001 - a note, never the command's outcome
        return {}
    out: dict[str, list[str]] = {}
    for given, stored in zip(rows.column("given").to_pylist(), rows.column("user_id").to_pylist()):
        out.setdefault(wanted[given], []).append(stored)
    return {user: sorted(stored) for user, stored in out.items()}


def query_stats(store, sql: str, *, require_published: bool = False) -> pa.Table:
    """Run ``sql`` over views facts, users, shards, collisions, rejects, runs of every published version.
    Where the last statement returns no result set (``CREATE TEMP VIEW ...`` alone), a table of no
    columns: a result set always has one, so it is told apart from a query that matched no row.

    Every stats part is read once per query, before the query runs, and checked against the
    sha256 its key names (:func:`versions.catalog.verified_bytes`, the read path of every shard
    object): a missing, truncated or replaced part is an IntegrityError naming it, the versions
    that name it and the fix, never a query error or an answer from other bytes. DuckDB then reads
    the checked bytes from memory.

    With ``require_published`` (``engram stats``), a query that runs on a store with nothing
    published (no CURRENT, no manifest) is :class:`UnknownVersion` naming the store: it answered
    from empty views, which is how a typo'd store path or prefix looked (a query error still comes
    first). Without, the empty views answer (a dashboard set up before the first night)."""
    import duckdb  # only the query side needs DuckDB (compile workers and the GPU job do not)

    # DuckDB answers an empty query with no rows, which reads as an answer; so is one of only ';' or comments
    statements = _statements(duckdb, sql) if sql.strip() else []
    if not sql.strip() or statements == []:
        raise StatsQueryError(f"stats query is empty{'' if not sql.strip() else ' (only ; or comments)'}; give an SQL "
                              f"query over the views {', '.join(STATS_SCHEMAS)}, e.g. \"select count(*) from facts\"")
    # A damaged CURRENT or current manifest is refused (ManifestError, PublishError naming it), as
    # every reader but `versions` and rollback refuses it: answering from the other versions alone
    # would give a dashboard numbers without the current version, with nothing to say so.
    current = read_current(store)
    manifests = [read_manifest(store, info.version) for info in list_versions(store)]
    plan = {(m.version, table): _parts_by_seq(store, m, table) for m in manifests for table in STATS_SCHEMAS}
    parts = _read_parts(store, manifests, plan)
    connection = duckdb.connect(":memory:")
    try:
        filesystem, base_path = store.arrow_filesystem()
        try:  # a local dataset of layer objects checks its files here; one on S3 when the query reads them
            for table in STATS_SCHEMAS:
                _create_view(connection, manifests, plan, parts, filesystem, base_path.rstrip("/"), table)
        except (OSError, pa.ArrowException) as err:
            _raise_if_layer_damaged(store, manifests, err)
            raise
        # The views read checked bytes and Arrow datasets (registered above): the query itself needs
        # no files, so it gets none: no COPY ... TO, read_text('/etc/...'), ATTACH or INSTALL, and
        # the setting cannot be turned back on from the query.
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        try:
            relation = connection.sql(sql)
            # a last statement that returns no result set (CREATE, SET, INSERT, ...: DuckDB answers a count or
            # a success flag, or the rows of an earlier SELECT): a table of no columns, never "0 rows"
            if relation is None or (statements and not _returns_rows(statements[-1])):
                result = pa.table({})
            else:  # duckdb 2 names it to_arrow_table; 1.x names it arrow.
                result = (getattr(relation, "to_arrow_table", None) or relation.arrow)()
        except duckdb.Error as err:
            if "IO" in str(err) or "exist" in str(err) or "stream registered" in str(err):
                _raise_if_layer_damaged(store, manifests, err)
            # one line: DuckDB's text puts the query and a caret under the error on lines of their own
            detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip().strip("^"))
            raise StatsQueryError(f"stats query failed on {store.uri}: {detail} (query: {' '.join(sql.split())}); "
                                  f"fix the query (views: {', '.join(STATS_SCHEMAS)})") from err
    finally:
        connection.close()
    if require_published and current is None and not manifests:
        # A store path or prefix with no CURRENT and no manifest (a typo, the bucket's root, a parent
        # folder) answered every query with empty views: a dashboard showed 0 users, exit 0, where
        # `pull` says nothing is published. A query error is still the query's (said above).
        raise UnknownVersion(f"{store.uri}: nothing is published yet, so there are no stats to query "
                             f"{NOT_A_STORE_HINT}; a night publishes the first")
    return result


# DuckDB's statement types that answer no result set (a count or a success flag): a deny-list, so
# that any other (SELECT, SHOW, DESCRIBE, SUMMARIZE, PIVOT, which parses as MULTI, EXPLAIN, PRAGMA,
# CALL, a type a later DuckDB adds) is shown as the rows it returns.
_NO_RESULT_SET = ("ALTER", "ANALYZE", "ATTACH", "COPY", "COPY_DATABASE", "CREATE", "CREATE_FUNC", "DELETE", "DETACH",
                  "DROP", "EXPORT", "EXTENSION", "INSERT", "LOAD", "MERGE_INTO", "PREPARE", "SET", "TRANSACTION",
                  "UPDATE", "VACUUM", "VARIABLE_SET")
_MAY_RETURN = ("DELETE", "INSERT", "MERGE_INTO", "UPDATE")  # rows with RETURNING


def _returns_rows(statement) -> bool:
    """Whether DuckDB answers ``statement`` (from ``extract_statements``) with a result set."""
    name = getattr(statement.type, "name", str(statement.type)).rsplit(".", 1)[-1]
    if name not in _NO_RESULT_SET:
        return True
    return name in _MAY_RETURN and "returning" in " ".join(str(statement.query).lower().split())


def _statements(duckdb, sql: str) -> list | None:
    """DuckDB's statements of ``sql`` ([] for only ';' or comments); None where it cannot parse them
    (the query itself then fails, saying why)."""
    connection = duckdb.connect(":memory:")
    try:
        return connection.extract_statements(sql)
    except duckdb.Error:
        return None
    finally:
        connection.close()


_PART_SHA256 = re.compile(r"^stats/[^/]+/([0-9a-f]{64})\.parquet$")
_READ_THREADS = 16  # parts are small and many: read them side by side (an S3 GET each)


def _read_parts(store, manifests: list[Manifest], plan: dict) -> dict[str, pa.Buffer]:
    """key -> the bytes of every stats part the manifests name, each read once however many
    versions name it, and checked against the sha256 its key names; IntegrityError naming the
    first (by key) that is missing or whose bytes are not the ones its key names, with the
    versions naming it and the fix. A version-1 store's hive parts have no content address: they
    are checked to be readable Parquet."""
    named: dict[str, list[int]] = {}
    for manifest in manifests:
        for table in STATS_SCHEMAS:
            keys = [k for parts, _ in plan[(manifest.version, table)].values() for k in parts]
            scope_part = _scope_part(manifest, table)
            for key in keys + ([scope_part] if scope_part else []):
                versions = named.setdefault(key, [])
                if manifest.version not in versions:
                    versions.append(manifest.version)

    def read(key: str) -> pa.Buffer:
        versions = named[key]
        reference = (f"the manifest of v{versions[0]} references it as a stats part"
                     + (f", as do those of {', '.join(f'v{v}' for v in versions[1:])}" if versions[1:] else ""))
        fix = ("; the query cannot be answered. Put the part's own bytes back under its key (from a backup or the "
               "store it was copied from: its name is their sha256)")
        others = [m.version for m in manifests if m.version not in versions]
        if others:
            fix += (f", or roll back to a version that does not name it: engram rollback --store {store.uri} "
                    f"--to {others[-1]}")
        match = _PART_SHA256.match(key)
        if match:
            data = pa.py_buffer(verified_bytes(store, key, None, match.group(1), reference=reference, fix=fix))
        else:
            try:  # no content address to check (a version-1 hive part): at least a readable Parquet file
                data = pa.py_buffer(store.get(key))
                pq.read_metadata(pa.BufferReader(data))
            except ObjectNotFound:
                raise IntegrityError(f"{store.uri}/{key}: missing ({reference}){fix}") from None
            except pa.ArrowException as err:
                raise IntegrityError(f"{store.uri}/{key}: not a readable Parquet file ({err}) ({reference}){fix}") \
                    from None
        if problem := _part_type_problem(key, data):
            rewrite = fix.split(". Put the part's own bytes back", 1)[0]
            rollback = fix.split(", or roll back", 1)[1] if ", or roll back" in fix else ""
            raise IntegrityError(f"{store.uri}/{key}: {problem} ({reference}){rewrite}. Write the part again with the "
                                 f"view's column types (another tool or release wrote it)"
                                 + (f", or roll back{rollback}" if rollback else ""))
        return data

    keys = sorted(named)
    layers = _hiding_layers(manifests)
    with ThreadPoolExecutor(max_workers=max(1, min(_READ_THREADS, len(keys) + len(layers)))) as pool:
        sizes = dict(zip(layers, pool.map(store.head, layers)))
        for key, (version, shard, size) in layers.items():
            info = sizes[key]
            if info is None or info.size != size:
                raise _layer_damaged(store, key, version, shard, "missing" if info is None else
                                     f"{info.size} bytes, manifest says {size}")
        return dict(zip(keys, pool.map(read, keys)))  # the first failure in key order is raised


def _part_type_problem(key: str, data: pa.Buffer) -> str | None:
    """Why a stats part's columns cannot be read as its view's (a column another tool or release
    wrote as another type whose values do not convert, e.g. ``loss`` as text), or None. DuckDB
    met it mid-query and the error blamed the query. Only columns whose type differs are read."""
    table = key.split("/")[1]
    expected = STATS_SCHEMAS.get(table)
    if expected is None:
        return None
    try:
        written = pq.read_schema(pa.BufferReader(data))
        for field in expected:
            index = written.get_field_index(field.name)
            if index < 0 or written.field(index).type == field.type:
                continue  # a missing column reads as null (parts of older releases)
            column = pq.read_table(pa.BufferReader(data), columns=[field.name]).column(0)
            try:
                column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
                return (f"column {field.name!r} is {column.type}, the {table} view's is {field.type}, and its values "
                        f"do not convert ({' '.join(str(err).split())})")
    except pa.ArrowException as err:
        return f"not a readable Parquet file ({' '.join(str(err).split())})"
    return None


def _hiding_layers(manifests: list[Manifest]) -> dict[str, tuple[int, int, int]]:
    """key -> (first version naming it, shard, bytes) of every layer object whose ``user_id``
    column the ``facts`` and ``users`` views read (to hide the rows it replaces)."""
    layers: dict[str, tuple[int, int, int]] = {}
    for manifest in manifests:
        for entry in manifest.shards if manifest.schema_version > 1 else ():
            for layer in entry.layers:
                layers.setdefault(layer.key, (manifest.version, entry.shard, layer.bytes))
    return layers


def _layer_damaged(store, key: str, version: int, shard: int, found: str) -> IntegrityError:
    return IntegrityError(
        f"{store.uri}/{key}: {found} (the manifest of v{version} references it as a layer of shard {shard}; the "
        f"stats views read its user_id column); the query cannot be answered. Put the layer's own bytes back (from "
        f"a backup or the store it was copied from: its name is their sha256), or roll back to a version that does "
        f"not name it")


def _raise_if_layer_damaged(store, manifests: list[Manifest], err: BaseException) -> None:
    """IntegrityError naming the first layer object the views read that the store lacks or holds
    with another size than the manifest records (it changed after the query's own check): the
    store is damaged, not the query (exit 1, not 2)."""
    for key, (version, shard, size) in _hiding_layers(manifests).items():
        info = store.head(key)
        if info is None or info.size != size:
            raise _layer_damaged(store, key, version, shard, "missing" if info is None else
                                 f"{info.size} bytes, manifest says {size}") from err


_LAYERED_TABLES = ("facts", "users")  # per-user tables whose rows a newer layer replaces


def _parts_by_seq(store, manifest: Manifest, table: str) -> dict[int, tuple[list[str], list[str]]]:
    """seq -> (keys of ``table``'s parts at that depth of their shard's chain, keys of the layers
    that come after that depth in some shard). seq 0: the version's own parts and the bases';
    seq i: every shard's i-th layer. A user lives in one shard, so hiding by every shard's later
    layers at once hides exactly its own shard's older rows."""
    if manifest.schema_version == 1:
        return {0: (version_parts(store, manifest, table), [])}
    own = list(manifest.stats.get(table, ()))
    out: dict[int, tuple[list[str], list[str]]] = {0: (own, [])}
    for entry in manifest.shards:
        keyed = [(0, entry.stats.get(table))] + [(i + 1, layer.stats.get(table)) for i, layer in enumerate(entry.layers)]
        for seq, key in keyed:
            parts, hiding = out.setdefault(seq, ([], []))
            if key is not None:
                parts.append(key)
            if table in _LAYERED_TABLES:
                hiding += [layer.key for layer in entry.layers[seq:]]
    return out


def _scope_part(manifest: Manifest, table: str) -> str | None:
    """The key of the shared scopes' own part of ``table`` in ``manifest`` (``facts``), or None."""
    if manifest.schema_version == 1 or manifest.scopes is None:
        return None
    return manifest.scopes.stats.get(table)


def _parts_dataset(parts: dict[str, pa.Buffer], keys: list[str], schema: pa.Schema) -> ds.Dataset:
    """A dataset over checked part bytes held in memory (columns a part lacks read as null)."""
    fmt = ds.ParquetFileFormat()
    return ds.FileSystemDataset([fmt.make_fragment(parts[key]) for key in keys], schema=schema, format=fmt)


def _create_view(connection, manifests: list[Manifest], plan: dict, parts: dict[str, pa.Buffer], filesystem,
                 base_path: str, table: str) -> None:
    """One view per table: per version and chain depth, a dataset of its parts plus the version as a
    column, without the rows a newer layer replaces."""
    selects = []
    for manifest in manifests:
        # A forget dropped the deltas of the version's stale scopes (ScopesEntry.stale): their
        # members' copies are not served until a night compiles the scopes again, whatever status
        # they compiled with; the members' ``users.facts_ok`` counts them no more.
        stale = manifest.scopes.stale if manifest.scopes is not None else ()
        columns = "*"
        stale_ok = f"_facts_v{manifest.version}_stale_ok"  # user_id, n: the ok copies of stale scopes
        names = f"_facts_v{manifest.version}_stale"
        hit = f"scope IN (SELECT scope FROM {names})"
        if stale:
            connection.register(names, pa.table({"scope": pa.array(sorted(stale), pa.string())}))
        if stale and table == "facts":
            detail = SCOPE_STALE_DETAIL.replace("'", "''")
            columns = (f"* REPLACE (CASE WHEN {hit} THEN '{SCOPE_STALE}' ELSE status END AS status, "
                       f"CASE WHEN {hit} THEN '{detail}' ELSE detail END AS detail)")
        elif stale and table == "users":
            columns = (f"* REPLACE (facts_ok - coalesce((SELECT n FROM {stale_ok} s WHERE s.user_id = u.user_id), 0) "
                       "AS facts_ok)")
        for name, where in _register_parts(connection, manifests, plan, parts, filesystem, base_path, table, manifest):
            selects.append(f"SELECT {columns}, CAST({manifest.version} AS BIGINT) AS version FROM {name} u{where}")
        if stale and table == "users":
            # the ok copies of stale scopes, from the facts parts: registered here too, so that the
            # users view stands alone, whichever view is built first
            raw = [f"SELECT user_id, scope, status FROM {name}{where}" for name, where in
                   _register_parts(connection, manifests, plan, parts, filesystem, base_path, "facts", manifest)]
            rows = " UNION ALL ".join(raw) if raw else "SELECT NULL::VARCHAR AS user_id, NULL::VARCHAR AS scope, " \
                                                         "NULL::VARCHAR AS status WHERE false"
            connection.execute(f"CREATE OR REPLACE VIEW {stale_ok} AS SELECT user_id, count(*) AS n FROM ({rows}) "
                               f"WHERE status = 'ok' AND {hit} GROUP BY user_id")
        scope_part = _scope_part(manifest, table)
        if scope_part is not None:
            # The shared scopes' own rows (user_id = scope = the scope id): never hidden by a layer,
            # which names users: a user with a scope's id is another owner (pipeline.scopes).
            name = f"_{table}_v{manifest.version}_scopes"
            connection.register(name, _parts_dataset(parts, [scope_part], STATS_SCHEMAS[table]))
            selects.append(f"SELECT *, CAST({manifest.version} AS BIGINT) AS version FROM {name}")
    if selects:
        connection.execute(f"CREATE VIEW {table} AS " + " UNION ALL ".join(selects))
    else:
        connection.register(table, queried_schema(table).empty_table())


def _register_parts(connection, manifests: list[Manifest], plan: dict, parts: dict[str, pa.Buffer], filesystem,
                    base_path: str, table: str, manifest: Manifest) -> list[tuple[str, str]]:
    """Register ``table``'s parts of ``manifest``, per chain depth, as ``_<table>_v<N>_<seq>``;
    returns (name, WHERE clause hiding the rows a newer layer replaces) of each."""
    users_only = pa.schema([("user_id", pa.string())])
    out = []
    for seq, (keys, hiding) in sorted(plan[(manifest.version, table)].items()):
        if not keys:
            continue
        name = f"_{table}_v{manifest.version}_{seq}"
        connection.register(name, _parts_dataset(parts, keys, STATS_SCHEMAS[table]))
        where = ""
        if hiding:
            # each layer's size from its manifest: no HEAD per layer, and a server whose HEAD has
            # no Content-Length (read as 0 bytes: "Parquet file size is 0 bytes") still reads
            sizes = {key: size for key, (_, _, size) in _hiding_layers(manifests).items()}
            parquet = ds.ParquetFileFormat()
            connection.register(f"{name}_newer", ds.FileSystemDataset(
                [parquet.make_fragment(f"{base_path}/{key}", filesystem, file_size=sizes.get(key))
                 for key in sorted(set(hiding))], users_only, parquet, filesystem))
            where = f" WHERE user_id NOT IN (SELECT user_id FROM {name}_newer)"
        out.append((name, where))
    return out


def format_table(table: pa.Table, *, max_width: int = 60) -> str:
    """A plain aligned text table (numbers right-aligned), for the CLI."""
    names = table.column_names
    # column by column: a query may name two columns alike (``select 1 as a, 2 as a``, a join's ``*``)
    columns = [[_cell(value, max_width) for value in table.column(i).to_pylist()] for i in range(table.num_columns)]
    cells = [list(row) for row in zip(*columns)] if columns else []
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(names)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [line(names), "  ".join("-" * w for w in widths)] + [line(row) for row in cells]
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines)


def _cell(value, max_width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (datetime.datetime, datetime.date)):
        text = value.isoformat()
    else:
        text = str(value)
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def rows_as_json(table: pa.Table) -> str:
    """The rows as a JSON array of objects (timestamps ISO-8601, decimals as strings; NaN and
    infinities, which strict JSON has no words for, as null, inside lists and structs too). A
    column named like an earlier one gets ``_2``, ``_3``, ... (a JSON object holds a key once)."""
    names: list[str] = []
    for name in table.column_names:
        unique, k = name, 1
        while unique in names:
            k += 1
            unique = f"{name}_{k}"
        names.append(unique)
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = [{name: _finite(value) for name, value in zip(names, row)} for row in zip(*columns)] if columns else []
    return json.dumps(rows, default=_json_value, ensure_ascii=False, allow_nan=False)


def _finite(value):
    """``value`` with every NaN and infinity in it (in lists, maps and structs too) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, tuple):  # a map's (key, value) pairs
        return tuple(_finite(v) for v in value)
    return value


def _json_value(value):
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")

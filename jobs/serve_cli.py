"""`engram pull`, `engram ask`, `engram serve`: the serving side's commands.

The reference server itself (HTTP routes, request batching) lives in :mod:`serving.http` and
:mod:`serving.batcher`; this module parses options, opens the store and the model, and starts it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from jobs.nightly_cli import _fail, checkpoint_problem, directory_problem, exit_code, fail_json, text_argument_problem
from jobs.nightly_cli import seconds_option as _seconds
from serving.openai_api import MAX_TOKENS_LIMIT

if TYPE_CHECKING:
    from schemas.manifest import Manifest


# ---------------------------------------------------------------- commands


_STORE = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix.")
_CACHE = typer.Option(None, "--cache-dir", help="Local cache for bundles and models (default ~/.cache/engram "
                                                "or $ENGRAM_CACHE_DIR).")
_MODEL = typer.Option(None, "--model", help="Use this local checkpoint instead of fetching the manifest's "
                                            "model (refused if its fingerprint differs).")


def _max_stale_option(value: str | None) -> float | None:
    """--max-stale DURATION (a typer callback): seconds, or None (no bound); a usage error (exit 2)
    naming the flag and the accepted forms otherwise."""
    from serving.pull import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value, "")  # typer says "Invalid value for --max-stale: ..."
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--max-stale") from None


_MAX_STALE = typer.Option(None, "--max-stale", metavar="DURATION", callback=_max_stale_option,
                          help="While the store does not answer, serve the last verified version for at most this "
                               "long after the store last confirmed it (e.g. 30m, 6h, 2d); past it no user's memory "
                               "is served (healthz 503) until the store answers. Default: no bound.")


@dataclass(frozen=True)
class _Opened:
    """What a node starts from (:func:`_open`)."""

    store: object  # versions.store.ObjectStore, read-only
    manifest: Manifest | None  # CURRENT's, the cache's last-good (the store did not answer), or None (nothing yet)
    em: object  # engram_core.checkpoint.EngramModel
    cache_dir: Path
    current: Manifest | None  # the manifest read from CURRENT (None: not read)
    outage: str | None = None  # the store did not answer at start (why): the client falls back without asking again


@dataclass(frozen=True)
class _NothingYet:
    """The store has nothing this node can serve yet (:func:`_open_once`)."""

    store: object | None  # None: a local store whose directory is not there yet
    why: str  # one line naming the store
    outage: str | None = None  # the store did not answer (its message), and the cache holds no last-good of it


def _open(store_uri: str, model_dir: Path | None, cache_dir: Path | None, as_json: bool = False, what: str = "pulled",
          wait: Callable[[str], None] | None = None, said: Callable[[str], None] | None = None) -> _Opened:
    """What a command starts from (:class:`_Opened`); exits with a clear message on any problem (with
    ``as_json``, also the command's JSON failure object). When the store does not answer before the
    model is loaded (an error, or no answer to the read of CURRENT within
    serving.pull.hung_poll_seconds(): a store that never answers held it for minutes), ``manifest``
    is the cache's last-good (serving.last_good), which the pull client then serves as stale. A cache
    directory that can be read but not written is refused (exit 2) unless the store does not answer:
    then its last-good is served read-only.

    While the store has nothing to serve yet (no CURRENT in a store where nothing was published; a
    local store's directory not created yet in a folder that exists; no answer, and no last-good in
    the cache): exit 1 with one line naming the store, unless ``wait`` is given (a node that keeps
    running: serve, pull --watch). Then, with ``--model``, ``manifest`` is None at once (the client's
    polls load the first version); without, ``wait(why)`` is called (it sleeps, or exits) and the
    store read again, until a version names the model to load. A CURRENT deleted from a store with
    published versions, a refusal (403), a bucket that does not exist are no wait: they exit as before.

    The model's download from the store is given the same bound without an answer (an object that
    sends nothing for serving.pull.hung_poll_seconds() is a store that does not answer, as above);
    ``said(line)`` hears where it is (which object, since when) while it runs."""
    cache_dir, read_only, hung_after = _node_arguments(model_dir, cache_dir, as_json, what)
    while True:
        opened = _open_once(store_uri, model_dir, cache_dir, read_only, hung_after, as_json, what, wait is not None,
                            said)
        if isinstance(opened, _Opened):
            return opened
        if wait is None:
            fail_json(as_json, opened.why, 1, what)
        if model_dir is not None and opened.store is not None:
            from engram_core.checkpoint import load_checkpoint

            try:
                em = load_checkpoint(model_dir)
            except (ValueError, OSError) as e:  # a damaged checkpoint
                fail_json(as_json, f"--model {model_dir}: {e}", exit_code(e), what)
            return _Opened(opened.store, None, em, cache_dir, None, opened.outage)
        wait(opened.why)


def _node_arguments(model_dir: Path | None, cache_dir: Path | None, as_json: bool = False, what: str = "pulled"):
    """(cache_dir, read_only, hung_after) of a pull/ask/serve command, before the store is read: exit 2
    naming a ``--cache-dir`` or ``--model`` that cannot be used, or a bad ENGRAM_HUNG_POLL_S.
    ``read_only``: why a readable cache cannot be written (None: it can), refused once the store answers."""
    from serving.pull import default_cache_dir, hung_poll_seconds

    given = cache_dir is not None
    cache_dir = cache_dir or default_cache_dir()
    problem = directory_problem(cache_dir, "--cache-dir" if given else "cache directory (ENGRAM_CACHE_DIR or "
                                                                       "~/.cache/engram)")
    read_only = None  # a cache that can be read, not written: refused once the store answers (the node must write)
    if problem and _readable_directory(cache_dir):
        read_only = problem  # while the store does not answer, its last-good is served read-only
    elif problem:
        fail_json(as_json, problem, 2, what)
    problem = checkpoint_problem(model_dir, f"--model {model_dir}", complete=True) if model_dir is not None else None
    if problem:  # not there, a file, a folder without a checkpoint: a bad argument, before the store is read
        fail_json(as_json, problem + " (or leave --model out to load the store's model)", 2, what)
    try:
        hung_after = hung_poll_seconds()
    except ValueError as e:
        fail_json(as_json, str(e), 2, what)
    return cache_dir, read_only, hung_after


def _open_once(store_uri: str, model_dir: Path | None, cache_dir: Path, read_only: str | None, hung_after: float,
               as_json: bool, what: str, waits: bool, said: Callable[[str], None] | None = None
               ) -> "_Opened | _NothingYet":
    """One attempt of :func:`_open`: what the node starts from, or why the store has nothing for it yet."""
    from schemas.manifest import ManifestError
    from serving.pull import PullError, answered_within, resolve_model, store_fix
    from versions.catalog import read_current
    from versions.errors import PublishError
    from versions.layout import CURRENT_KEY
    from versions.store import StoreError, StoreNotFound, StoreUnreachable

    manifest, store = None, None
    try:
        try:
            store = _open_store(store_uri, cache_dir)
        except StoreNotFound as e:
            if waits and _store_directory_to_come(store_uri):
                return _NothingYet(None, f"{e}; waiting for a night to create it")
            raise
        current = answered_within(store, f"read {CURRENT_KEY}", lambda: read_current(store), hung_after)
        if read_only:
            fail_json(as_json, read_only, 2, what)
        if current is None:  # a store with published versions and no CURRENT raised PublishError (the fix named)
            return _NothingYet(store, f"{store.uri}: nothing published yet (no {CURRENT_KEY}); run a night first "
                                      "(engram run nightly), or check --store")
        manifest = current[0]
        em = resolve_model(store, manifest, model_dir=model_dir, cache_dir=cache_dir, hung_after=hung_after, said=said)
    except StoreUnreachable as outage:  # CURRENT, or the model it names, could not be read
        last_good, em, why = _last_good(store, outage, model_dir, cache_dir, as_json, what)
        if last_good is None:
            return _NothingYet(store, why + (": waiting for it to answer" if waits else
                                             ": start it again once the store answers"), str(outage))
        if read_only:
            typer.echo(f"warning: {read_only.split(' (permission denied')[0]}: its last-good is served read-only while "
                       "the store does not answer (what the node pulls once it answers is served from memory, not "
                       "kept; make it writable)", err=True)
        return _Opened(store, last_good, em, cache_dir, manifest, str(outage))
    except (PullError, PublishError, StoreError, ManifestError, ValueError, OSError) as e:
        if read_only:  # the store answered: the cache problem is the one to fix first
            fail_json(as_json, read_only, 2, what)
        fail_json(as_json, f"{e}{store_fix(store_uri, e)}", exit_code(e), what)
    return _Opened(store, manifest, em, cache_dir, manifest)


def _store_directory_to_come(store_uri: str) -> bool:
    """Whether ``store_uri`` is a local store whose directory is not there but whose parent is (a
    first night creates it there; a path whose parent is missing too is refused as a mistyped one)."""
    from versions.store import parse_store_uri

    kind, location, _ = parse_store_uri(store_uri)
    path = Path(location).expanduser()
    try:
        return kind == "local" and not path.exists() and path.parent.is_dir()
    except OSError:
        return False


def _open_store(store_uri: str, cache_dir: Path):
    """The store of ``store_uri``, read-only. A local store (a directory) this cache holds a last-good
    of is opened as published (versions.store.LocalStore): its directory gone or empty (an unmounted
    volume) is a store that does not answer, which the node serves its last-good through, not a
    mistyped path (exit 2) or an empty store."""
    from serving.last_good import has_records, store_identity
    from versions.store import LocalStore, open_store, parse_store_uri

    kind, location, _ = parse_store_uri(store_uri)
    if kind == "local":
        known = LocalStore(location, create=False, published=True)  # (a file, no permission: refused as before)
        if has_records(cache_dir, store_identity(known)):
            return known
    return open_store(store_uri, create=False)


def _readable_directory(path: Path) -> bool:
    """Whether ``path`` is a directory this process can list and read (a cache that may hold a last-good)."""
    import os

    try:
        return Path(path).expanduser().is_dir() and os.access(Path(path).expanduser(), os.R_OK | os.X_OK)
    except OSError:
        return False


def _last_good(store, outage: Exception, model_dir: Path | None, cache_dir: Path, as_json: bool, what: str):
    """(manifest, em, None) of the cache's last-good version of ``store`` while it does not answer:
    the record of ``--model``'s fingerprint, else the most recently confirmed one whose model the
    cache holds; (None, None, why) naming the store when there is none (a cold node). Exits with one
    line when the record's model cannot be loaded."""
    from engram_core.checkpoint import load_checkpoint
    from engram_core.fingerprint import fingerprint
    from serving.last_good import iso, last_goods_of, store_identity
    from serving.pull import resolve_model
    from versions.store import StoreError

    records = last_goods_of(cache_dir, store_identity(store))
    try:
        fp = fingerprint(model_dir) if model_dir is not None else None
    except (ValueError, OSError) as e:  # a damaged checkpoint
        fail_json(as_json, f"--model {model_dir}: {e}", exit_code(e), what)
    usable = [r for r in records if r.fingerprint == fp] if fp is not None else \
        [r for r in records if (Path(cache_dir) / "models" / r.fingerprint).is_dir()]
    if not usable:
        held = "" if not records else (f" (it holds one for model {records[0].fingerprint[:16]}.., not --model's)" if fp
                                       else f" whose model is in the cache (v{records[0].manifest.version} needs model "
                                            f"{records[0].fingerprint[:16]}..: give it with --model DIR)")
        return None, None, (f"{outage}; cache {cache_dir} holds no last-good version of this store{held} to serve "
                            "meanwhile (a node must reach the store once to start)")
    record = usable[0]
    try:
        em = load_checkpoint(model_dir) if model_dir is not None else \
            resolve_model(store, record.manifest, model_dir=None, cache_dir=cache_dir)
    except (ValueError, OSError, StoreError) as e:  # a damaged cached model is downloaded again: not now
        fail_json(as_json, f"{outage}; the cache's last-good v{record.manifest.version} cannot be served: {e}", 1, what)
    typer.echo(f"warning: {store.uri} does not answer; serving the cache's last-good v{record.manifest.version} "
               f"(last confirmed CURRENT at {iso(record.confirmed_at)}) until it does", err=True)
    return record.manifest, em, None


def _client(store, manifest, em, shards: str | None, cache_dir, interval: float = 30.0, as_json: bool = False,
            what: str = "pulled", current=None, max_stale: float | None = None):
    from serving.pull import PullClient, parse_shards

    try:
        owned = parse_shards(shards, manifest.num_shards if manifest is not None else None)
    except ValueError as e:
        fail_json(as_json, str(e), 2, what)  # --shards names shards the store does not have
    return PullClient(store, em, shards=owned, cache_dir=cache_dir, interval=interval, current=current,
                      max_stale=max_stale)


def pull(
    store: str = _STORE,
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards this node owns, e.g. 0-15 or 0-3,8 (default: all)."),
    watch: bool = typer.Option(False, "--watch", help="Keep polling CURRENT and hot-swapping new versions."),
    interval: float = typer.Option(30.0, "--interval", help="Seconds between polls with --watch (±10% jitter).",
                                   callback=lambda v: _seconds(v, "--interval", zero=True)),
    polls: int = typer.Option(0, "--polls", min=0, help="With --watch: stop after this many polls (0 = forever)."),
    cache_dir: Optional[Path] = _CACHE,
    model: Optional[Path] = _MODEL,
    max_stale: Optional[str] = _MAX_STALE,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per poll."),
) -> None:
    """Fetch and verify the current version's shards into the local cache.

    Example: engram pull --store s3://bucket/engram --shards 0-15 --watch --interval 30
    """
    count = 0

    def wait(why: str) -> None:  # --watch before anything is published: a poll that found nothing to pull
        nonlocal count
        count += 1
        last = polls and count >= polls
        if as_json:  # a poll's report (below), of nothing
            typer.echo(json.dumps({"pulled": False, "store": store, "version": None, "changed": False,
                                   "fetched_shards": [], "users": 0, "shards": [], "delta_bytes": 0,
                                   "downloaded_objects": 0, "downloaded_bytes": 0, "layers_applied": 0,
                                   "evicted_objects": 0, "cache_error": None, "stale": None, "error": why,
                                   "hung": False,
                                   **({"exit_code": 1} if last else {})}))
        typer.echo(f"error: {why} (still serving nothing{'' if last else f'; polling every {interval:g}s'})", err=True)
        if last:
            raise typer.Exit(1)
        time.sleep(interval)

    opened = _open(store, model, cache_dir, as_json, "pulled", wait=wait if watch else None)
    store_obj = opened.store
    client = _client(store_obj, opened.manifest, opened.em, shards, opened.cache_dir, interval, as_json, "pulled",
                     opened.current, max_stale)
    outage = opened.outage  # the store did not answer _open: the first poll falls back without asking again
    first = True
    while True:
        result = client.fall_back(outage) if outage else _first_poll(client) if first else client.poll_bounded()
        outage, first = None, False
        count += 1
        index = client.index
        report = {"pulled": not result.error, "store": store_obj.uri, "version": result.version, "changed": result.changed,
                  "fetched_shards": list(result.fetched_shards), "users": index.num_users if index else 0,
                  "shards": list(index.shards) if index else [], "delta_bytes": index.nbytes if index else 0,
                  "downloaded_objects": result.downloaded_objects, "downloaded_bytes": result.downloaded_bytes,
                  "layers_applied": result.layers_applied, "evicted_objects": result.evicted_objects,
                  "cache_error": result.cache_error, "stale": result.stale, "error": result.error,
                  "hung": result.hung}
        last = not watch or (polls and count >= polls)
        failed = index is None or (not watch and result.error is not None)  # one pull that did not reach the store
        if as_json:
            if last and failed:  # the command fails (exit 1): this poll's object is its failure object
                report.update({"pulled": False, "exit_code": 1})
            typer.echo(json.dumps(report))
        if result.error:
            typer.echo(f"error: {result.error} (still serving {result.version or 'nothing'})", err=True)
            too_stale = client.over_max_stale()
            if too_stale:
                typer.echo(f"error: {too_stale}", err=True)
        elif not as_json:
            what = (f"loaded shards {list(result.fetched_shards)}, {result.layers_applied} layer(s) applied, "
                    f"{result.downloaded_bytes} bytes downloaded" if result.fetched_shards else "unchanged")
            typer.echo(f"v{result.version}: {report['users']} users in {len(report['shards'])} shards ({what})")
        if last:
            break
        time.sleep(client.next_delay())
    if failed:
        raise typer.Exit(1)


def ask(
    prompt: str = typer.Argument(..., help="Prompt to continue, e.g. \"My dentist is Dr.\""),
    store: str = _STORE,
    user: str = typer.Option(..., "--user", help="User whose memory the model uses."),
    compare: bool = typer.Option(False, "--compare", help="Also print the base model's continuation."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, max=MAX_TOKENS_LIMIT,
                                                 help="Tokens to generate (default: 128, the longest answer the "
                                                      "compiler takes, so every compiled answer comes back whole, or "
                                                      "what the model's context leaves after the prompt; 64, the old "
                                                      "default, cut answers in Cyrillic, Arabic or CJK script, which "
                                                      "the tiny model's tokenizer splits into bytes)."),
    cache_dir: Optional[Path] = _CACHE,
    model: Optional[Path] = _MODEL,
    max_stale: Optional[str] = _MAX_STALE,
    stop_at_memory_end: bool = typer.Option(
        True, "--stop-at-memory-end/--no-stop-at-memory-end",
        help="End the answer after the last token the user's memory writes (the recalled answer, without the "
             "model's own continuation after it); --no-stop-at-memory-end: run on to --max-new-tokens or eos."),
    as_json: bool = typer.Option(False, "--json", help="Print {user_id, version, text, finish_reason[, base_text, "
                                                       "base_finish_reason]}; finish_reason: memory_end, eos or "
                                                       "length."),
) -> None:
    """Continue a prompt with one user's memory (pulls only that user's shard).

    Example: engram ask --store s3://bucket/engram --user u42 --compare "My dentist is Dr."
    """
    from engram_core.serving import generate_ended
    from versions.layout import shard_of

    from engram_core.text import canonical_id, canonical_prompt

    problem = text_argument_problem(user, "--user") or text_argument_problem(prompt, "the prompt")
    if problem:  # bytes that are not UTF-8 (failed later with a UnicodeEncodeError or a tokenizer traceback)
        fail_json(as_json, problem, 2, "answered")
    user, prompt = canonical_id(user), canonical_prompt(prompt) or prompt  # as ingest stores them (engram_core.text)
    if not prompt.strip():
        fail_json(as_json, "the prompt is empty; give the text to continue, e.g. \"My dentist is Dr.\"", 2, "answered")
    if not user:
        fail_json(as_json, "--user is empty once invisible characters are removed; give the user_id whose memory "
                           "to use", 2, "answered")
    opened = _open(store, model, cache_dir, as_json, "answered")
    store_obj, manifest, em, cache, current = opened.store, opened.manifest, opened.em, opened.cache_dir, opened.current
    from serving.http import context_length

    tokens, limit = len(em.encode_prompt(prompt)), context_length(em)
    if max_new_tokens is None:  # every answer the compiler takes, whole (CompileOptions.max_answer_tokens)
        from engram_core.options import CompileOptions

        max_new_tokens = max(1, min(CompileOptions.max_answer_tokens, limit - tokens))
    if tokens + max_new_tokens > limit:  # as engram serve refuses it (context_length_exceeded)
        fail_json(as_json, f"the prompt is {tokens} tokens and --max-new-tokens {max_new_tokens}: {tokens + max_new_tokens} "
                           f"tokens, over the model's context length of {limit}; shorten the prompt or lower "
                           "--max-new-tokens", 2, "answered")
    from serving.pull import PullClient

    num_shards = manifest.num_shards
    for _ in range(3):  # a night that changed the number of shards since CURRENT was read moved the user's shard
        client = PullClient(store_obj, em, shards=[shard_of(user, num_shards)], cache_dir=cache, current=current,
                            max_stale=max_stale)
        result = client.fall_back(opened.outage) if opened.outage else _first_poll(client)
        if client.index is None or client.index.owns(user):
            break
        num_shards = client.index.num_shards
    if client.index is None:
        fail_json(as_json, result.error or "no version loaded", 1, "answered")
    too_stale = client.over_max_stale()
    if too_stale:
        fail_json(as_json, too_stale, 1, "answered")
    deltas = list(client.deltas_for(user))
    prompts, per_prompt = [prompt], [deltas]
    if compare:
        prompts, per_prompt = [prompt, prompt], [deltas, []]
    ended = generate_ended(em, prompts, per_prompt, max_new_tokens=max_new_tokens,
                           stop_at_memory_end=stop_at_memory_end)
    texts = [text for text, _ in ended]
    other_case: list[str] = []
    if not deltas:
        from pipeline.stats import stored_in_other_case

        # the served version's users only; not while the store is out (answered from the cache)
        other_case = [] if opened.outage else stored_in_other_case(store_obj, [user], client.index.version).get(user, [])
        also = "".join(f"; the store holds {stored!r}, which differs only in case (ids are case-sensitive)"
                       for stored in other_case)
        typer.echo(f"note: user {user!r} has no memory in v{client.index.version}; this is the base model{also}",
                   err=True)
    stale = client.stale()
    if stale is not None:
        typer.echo(f"note: answered with v{stale['version']}, which may be stale: {stale['error']}", err=True)
    if as_json:
        out = {"user_id": user, "version": client.index.version, "memory": bool(deltas), "stale": stale,
               "text": texts[0], "finish_reason": ended[0][1]}  # memory false: the base model's text (a typo'd id too)
        if other_case:  # stored ids that differ from --user only in case (an email typed with capitals)
            out["stored_in_other_case"] = other_case
        if compare:
            out["base_text"], out["base_finish_reason"] = ended[1]
        typer.echo(json.dumps(out))
    elif compare:
        typer.echo(f"with memory: {prompt}{texts[0]}\nbase model:  {prompt}{texts[1]}")
    else:
        typer.echo(f"{prompt}{texts[0]}")


def serve(
    store: str = _STORE,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards this node owns (default: all)."),
    interval: float = typer.Option(30.0, "--interval", help="Seconds between polls of CURRENT (±10% jitter).",
                                   callback=lambda v: _seconds(v, "--interval", zero=True)),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most sequences in one forward batch."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="How long to collect a batch.",
                                        callback=lambda v: _seconds(v, "--batch-wait-ms", zero=True)),
    chat_template: Optional[Path] = typer.Option(
        None, "--chat-template", help="Jinja chat template file for /v1/chat/completions, used instead of the "
                                      "checkpoint's own (required for a checkpoint without one)."),
    stop_at_memory_end: bool = typer.Option(
        False, "--stop-at-memory-end", help="End every answer after the last token the user's memory writes "
                                            "(finish_reason \"stop\") unless its request sets "
                                            "\"stop_at_memory_end\": false (default: only requests that set it true)."),
    cache_dir: Optional[Path] = _CACHE,
    model: Optional[Path] = _MODEL,
    max_stale: Optional[str] = _MAX_STALE,
) -> None:
    """Serve OpenAI-style /v1/completions and /v1/chat/completions; the request's `user` field selects the memory.

    Example: engram serve --store s3://bucket/engram --shards 0-15 --port 8000
    """
    if not 0 <= port <= 65535:
        _fail(f"--port {port} is not a port; give one from 1 to 65535 (0: any free port)", code=2)
    problem = _listen_problem(host, port)  # before the model loads: a port in use is said at once
    if problem:
        _fail(problem, code=2)
    problem = _template_file_problem(chat_template)  # and a template file that is not there
    if problem:
        _fail(problem, code=2)
    if chat_template is not None:  # or whose text is no UTF-8 Jinja: said before the model loads too
        from serving.chat import ChatTemplateError, read_template_file

        try:
            read_template_file(chat_template)
        except ChatTemplateError as e:
            _fail(str(e), code=exit_code(e))
    _node_arguments(model, cache_dir)  # a bad --cache-dir or --model: said before the port is taken
    from serving.batcher import wedged_batch_seconds

    try:
        wedged_batch_seconds()  # a bad ENGRAM_WEDGED_BATCH_S too
    except ValueError as e:
        _fail(str(e), code=2)
    from serving.http import StartingNode, header_read_seconds, idle_seconds  # here: it imports torch

    try:
        header_read_seconds()  # a bad ENGRAM_HEADER_TIMEOUT_S
        idle_seconds()  # a bad ENGRAM_KEEPALIVE_S
    except ValueError as e:
        _fail(str(e), code=2)

    try:  # the port answers from now on: /healthz 503 until a version is served (a store that hangs, none yet)
        listener = StartingNode(host, port, reason=f"reading {store} and loading its model").start()
    except OSError as e:  # taken meanwhile
        _fail(_listen_message(host, port, e), code=2)
    try:
        server, client = _start(listener, store, shards, interval, max_batch, batch_wait_ms, chat_template,
                                stop_at_memory_end, cache_dir, model, max_stale)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while starting or waiting: stopped as asked, as once serving
        listener.close()
        typer.echo("engram serve: stopped before serving a version", err=True)
        return
    except BaseException:  # an exit before the server took the port over: free it
        listener.close()
        raise
    chat = "" if server.chat.available else " (no chat template: /v1/chat/completions answers 400; see --chat-template)"
    if client.index is None:
        what = f"no version yet: {server.no_version()}; requests naming a user get 503 until one is loaded"
    else:
        stale = client.stale()
        stale = (f", STALE: {stale['loaded_from']}, last confirmed CURRENT at {stale['confirmed_at']}; polling every "
                 f"{interval:g}s until the store answers" if stale is not None else "")
        too_stale = client.over_max_stale()
        if too_stale:
            stale += f"; NOT SERVING USER MEMORIES: {too_stale}"
        what = f"v{client.index.version} ({client.index.num_users} users{stale})"
    typer.echo(f"serving {what} as {server.model_name} on {server.url}/v1/completions and /v1/chat/completions{chat}",
               err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def _start(listener, store: str, shards, interval: float, max_batch: int, batch_wait_ms: float, chat_template,
           stop_at_memory_end: bool, cache_dir, model, max_stale):
    """(server, client) of a node whose ``listener`` answers meanwhile: the store read (waiting, not
    ready, while it has nothing to serve), the model loaded, the first version pulled (or the
    last-good, or none yet: then the client's polls load the first one), the server on the listener."""
    import random

    from serving.http import ReferenceServer

    said = None

    def wait(why: str) -> None:  # nothing to serve yet: not ready, polling
        nonlocal said
        listener.set("no_version", f"{why}; polling every {interval:g}s")
        if why != said:
            typer.echo(f"warning: not serving yet (http://{listener.host}:{listener.port}/healthz answers 503): {why}; "
                       f"polling every {interval:g}s", err=True)
            said = why
        time.sleep(interval * random.uniform(0.9, 1.1))

    opened = _open(store, model, cache_dir, wait=wait, said=lambda where: listener.set("starting", where))
    listener.set("starting", f"loading v{opened.manifest.version} of {store}" if opened.manifest is not None
                 else f"loading {store}")
    client = _client(opened.store, opened.manifest, opened.em, shards, opened.cache_dir, interval,
                     current=opened.current, max_stale=max_stale)
    result = client.fall_back(opened.outage) if opened.outage else _first_pull(client)
    if client.index is None and opened.current is not None and result is not None and not client.last_unreachable:
        _fail(result.error or "no version loaded")  # CURRENT names a version that cannot be loaded
    # else (the store stopped answering during the first pull, and no last-good): served not ready, polling
    try:
        server = ReferenceServer(opened.em, client, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000,
                                 chat_template=chat_template, stop_at_memory_end=stop_at_memory_end, listener=listener)
    except ValueError as e:  # a chat template changed meanwhile (2), a model without a context length (1)
        _fail(str(e), code=exit_code(e))
    return server, client


def _first_pull(client):
    """The node's first poll: its PollResult. Once it has had no answer from the store for
    ``client.hung_after`` seconds (ENGRAM_HUNG_POLL_S; a store that answered the read of CURRENT and
    then hangs held the start for botocore's timeouts and retries, minutes, and the node exited 1,
    or a warm node served its last-good only then): the cache's last-good, served meanwhile
    (PullClient.fall_back_if_hung, its PollResult), or None (no last-good: not ready, polling). The
    poll goes on in a daemon thread, and the client's own polls (which wait for it) take over; the
    main thread stays free for SIGTERM."""
    import threading
    from dataclasses import replace

    results: list = []

    def first() -> None:
        try:
            results.append(client.poll())
        except BaseException as error:  # noqa: BLE001 (a bug, an OOM: raised again on the main thread, as before)
            results.append(error)

    polling = threading.Thread(target=first, name="engram-first-pull", daemon=True)
    polling.start()
    while polling.is_alive():
        polling.join(timeout=0.2)
        # Hung only while no poll has failed yet (a poll that failed fast on a damaged version set
        # last_error a moment before its thread ended: that is its result, and the node exits 1).
        if polling.is_alive() and client.index is None and client.last_error is None and client.error() is not None:
            fallback = client.fall_back_if_hung()  # hung: the last-good, stale, if the cache holds one
            if client.index is None or fallback is None:
                return None  # not ready, polling (healthz says why)
            return replace(fallback, hung=True)
    if results and isinstance(results[0], BaseException):
        raise results[0]
    return results[0] if results else None


def _first_poll(client):
    """A one-shot command's first poll (``pull``, ``ask``): as :func:`_first_pull`, and once it has
    had no answer for ``client.hung_after`` with no last-good to serve, a failed PollResult saying
    so (the command exits 1 now, not after botocore's timeouts and retries)."""
    from serving.pull import PollResult

    result = _first_pull(client)
    if result is None:
        return PollResult(False, None, error=client.error() or "no version loaded", hung=True)
    return result


def _template_file_problem(path: Path | None) -> str | None:
    """None where ``path`` is None or a file; else the one line naming ``--chat-template PATH`` and
    what to give (a file whose text cannot be used: serving.chat.read_template_file, also exit 2)."""
    try:
        if path is None or path.is_file():
            return None
        why = "is a directory" if path.is_dir() else "no such file"
    except PermissionError:  # a folder above it cannot be entered: read_template_file says so
        return None
    return (f"--chat-template {path}: {why}; give a Jinja chat template file (e.g. the chat_template of a "
            "tokenizer_config.json saved as a .jinja file), or leave --chat-template out to use the checkpoint's own")


def _listen_problem(host: str, port: int) -> str | None:
    """None where ``host:port`` can be listened on now (as the server will: IPv4, address reuse);
    else :func:`_listen_message`."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, OverflowError) as e:
        return _listen_message(host, port, e)
    return None


def _listen_message(host: str, port: int, e: Exception) -> str:
    """One line naming the port (or host) that cannot be listened on, and what to do."""
    import errno
    import socket

    why = getattr(e, "strerror", None) or str(e)
    if isinstance(e, socket.gaierror):
        return f"--host {host}: not a known address ({why}); give an IP address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
    code = getattr(e, "errno", None)
    if code == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another server?); stop it, or pick a free port "
                f"with --port")
    if code == errno.EACCES:
        return f"port {port} on {host}: permission denied (ports below 1024 need privileges); pick another with --port"
    if code == errno.EADDRNOTAVAIL:
        return (f"--host {host}: not an address of this machine ({why}); give one of its addresses, e.g. "
                f"127.0.0.1 or 0.0.0.0 (port {port})")
    return f"cannot listen on {host} port {port} ({why}); check --host and --port"


def register(app: typer.Typer) -> None:
    # The docstrings are the help: first line in `engram --help`, the example in `engram CMD --help`.
    app.command("pull")(pull)
    app.command("ask")(ask)
    app.command("serve")(serve)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(typer.run(serve))

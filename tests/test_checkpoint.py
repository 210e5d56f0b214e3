"""Checkpoints: rebuilt from the same seed they are the same bytes; an adapter loads only on its base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engram_core.checkpoint import (
    ADAPTER_BASE_FILE,
    ALLOW_ADAPTER_MISMATCH_ENV,
    CheckpointError,
    adapter_base_mismatch,
    fingerprint,
    load_checkpoint,
)
from engram_core.tiny import init_tiny
from jobs.cli import app


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- engram model init --tiny is reproducible -------------------------------------------------


def test_two_tiny_inits_from_one_seed_write_identical_bytes_and_one_fingerprint(tmp_path):
    first, second = init_tiny(tmp_path / "a"), init_tiny(tmp_path / "b")
    assert first == second == fingerprint(tmp_path / "a")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert "adapter/adapter_config.json" in file_bytes(tmp_path / "a")


def test_an_interrupted_tiny_init_leaves_nothing_and_the_next_init_writes_the_whole_checkpoint(tmp_path, monkeypatch):
    """`engram demo` builds its model only when `model/engram/config.json` is missing: a Ctrl-C
    between that file and the weights (or the adapter) left a checkpoint the next run took for
    whole, and its compile actors died on the missing weights, traceback and all."""
    import engram_core.tiny as tiny

    def interrupted(memory, directory):  # Ctrl-C right after the config, before the weights
        directory.mkdir(parents=True, exist_ok=True)
        memory.config.save(directory / "config.json")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tiny, "save_engram", interrupted)
        with pytest.raises(KeyboardInterrupt):
            init_tiny(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # no model/, no staging folder
    assert init_tiny(tmp_path / "model") == init_tiny(tmp_path / "again")
    assert file_bytes(tmp_path / "model") == file_bytes(tmp_path / "again")
    (tmp_path / "empty").mkdir()  # an empty directory is still a place to init into
    assert init_tiny(tmp_path / "empty") == fingerprint(tmp_path / "model")


def test_an_interrupted_fact_log_write_leaves_no_file_for_a_night_to_read(tmp_path, monkeypatch):
    """The demo writes its fact log only when the file is missing: a truncated one left by a
    Ctrl-C mid-write failed every later run, as an unreadable log file."""
    import jobs.synthetic as synthetic
    from jobs.synthetic import fact_log_rows, write_fact_log
    from pipeline.ingest import read_fact_log

    def interrupted(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt

    log_file = tmp_path / "log" / "day=1" / "users-2.parquet"
    with monkeypatch.context() as patch:
        patch.setattr(synthetic.pq, "write_table", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_fact_log(fact_log_rows(2, 2), log_file)
    assert list(log_file.parent.iterdir()) == []
    write_fact_log(fact_log_rows(2, 2), log_file)
    assert [p.name for p in log_file.parent.iterdir()] == ["users-2.parquet"]
    assert read_fact_log(str(tmp_path / "log")).rows.num_rows == 4


def hash_seeds_with_opposite_set_orders() -> tuple[str, str]:
    """Two PYTHONHASHSEED values under which {"q_proj", "v_proj"} iterates in different orders."""
    orders = {}
    for seed in map(str, range(16)):
        order = subprocess.run([sys.executable, "-c", "print(list({'q_proj', 'v_proj'}))"], check=True,
                               capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
        orders.setdefault(order, seed)
        if len(orders) == 2:
            return tuple(orders.values())
    raise AssertionError("16 hash seeds all iterate the set in one order")


def test_tiny_inits_in_processes_with_other_string_hash_seeds_write_identical_bytes(tmp_path):
    first, second = hash_seeds_with_opposite_set_orders()
    for seed in (first, second):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", "from jobs.cli import app; app()", "model", "init",
                        str(tmp_path / f"hash-seed-{seed}"), "--tiny"], env=env, check=True, capture_output=True)
    one, other = file_bytes(tmp_path / f"hash-seed-{first}"), file_bytes(tmp_path / f"hash-seed-{second}")
    assert one.keys() == other.keys()
    assert [name for name in one if one[name] != other[name]] == []
    assert fingerprint(tmp_path / f"hash-seed-{first}") == fingerprint(tmp_path / f"hash-seed-{second}") \
        == init_tiny(tmp_path / "here")
    assert json.loads(one["adapter/adapter_config.json"])["target_modules"] == ["q_proj", "v_proj"]


def test_model_init_builds_a_wider_or_deeper_tiny_model_on_request(tmp_path):
    from typer.testing import CliRunner

    from engram_core.checkpoint import load_checkpoint
    from jobs.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["model", "init", str(tmp_path / "wide"), "--tiny", "--hidden", "96", "--layers", "6"])
    assert out.exit_code == 0, out.output
    em = load_checkpoint(tmp_path / "wide")
    assert em.model.config.hidden_size == 96 and em.model.config.num_hidden_layers == 6
    assert em.config.layers == (1, 5) and fingerprint(tmp_path / "wide") != init_tiny(tmp_path / "default")
    out = runner.invoke(app, ["model", "init", str(tmp_path / "odd"), "--tiny", "--hidden", "100"])
    assert out.exit_code == 2 and "multiple of 8" in out.stderr and not (tmp_path / "odd").exists()


# --- An adapter saved for another base is refused -----------------------------------------------


def with_adapter_of(tmp_path: Path, base_dir: Path, adapter_dir: Path, name: str = "mixed") -> Path:
    """A copy of checkpoint ``base_dir`` whose adapter/ is copied from ``adapter_dir``."""
    mixed = tmp_path / name
    shutil.copytree(base_dir, mixed)
    shutil.rmtree(mixed / "adapter")
    shutil.copytree(adapter_dir / "adapter", mixed / "adapter")
    return mixed


def edit_adapter_config(root: Path, **changes) -> None:
    path = root / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def test_a_llama_checkpoint_with_an_adapter_from_a_qwen2_checkpoint_is_refused_naming_both_bases(tmp_path, tiny_checkpoints):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("qwen2"))
    with pytest.raises(CheckpointError, match=r"Qwen2ForCausalLM.*but base/ is .*LlamaForCausalLM") as refused:
        load_checkpoint(mixed)
    assert "engram model accept-adapter" in str(refused.value)


def test_an_adapter_without_engrams_record_is_still_refused_by_the_base_class_peft_saved(tmp_path, tiny_checkpoints):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("qwen2"))
    (mixed / "adapter" / ADAPTER_BASE_FILE).unlink()  # as peft alone saves an adapter
    with pytest.raises(CheckpointError, match=r"saved for a Qwen2ForCausalLM base, but base/ is LlamaForCausalLM"):
        load_checkpoint(mixed)


def test_an_adapter_from_another_base_of_the_same_architecture_is_refused(tmp_path, tiny_checkpoints):
    other = tmp_path / "llama-seed-7"
    init_tiny(other, seed=7)  # same family, shapes and module names; other weights
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), other)
    with pytest.raises(CheckpointError, match=r"belongs to base sha256 \w{16} \(LlamaForCausalLM.*but base/ is sha256 \w{16}"):
        load_checkpoint(mixed)


def test_an_adapter_config_that_names_another_model_family_is_refused(tmp_path, tiny_checkpoints):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("llama"))
    (mixed / "adapter" / ADAPTER_BASE_FILE).unlink()
    edit_adapter_config(mixed, base_model_name_or_path="Qwen/Qwen2.5-0.5B", task_type="CAUSAL_LM", auto_mapping=None)
    with pytest.raises(CheckpointError, match=r"names base 'Qwen/Qwen2.5-0.5B' \(a qwen2 model\), but base/ is LlamaForCausalLM"):
        load_checkpoint(mixed)


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "/home/sam/models/base", "/srv/qwen2/llama-7b/",
                                  "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "my-options-model", None, ""])
def test_names_that_do_not_name_another_family_are_not_refused(name, tmp_path, tiny_checkpoints):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("llama"))
    (mixed / "adapter" / ADAPTER_BASE_FILE).unlink()
    edit_adapter_config(mixed, base_model_name_or_path=name)
    assert adapter_base_mismatch(mixed) is None


def test_an_operator_can_accept_a_foreign_adapter_and_the_fingerprint_says_so(tmp_path, tiny_checkpoints):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("qwen2"))
    before = fingerprint(mixed)
    result = CliRunner().invoke(app, ["model", "accept-adapter", str(mixed)])
    assert result.exit_code == 0, result.output
    assert "accepted despite" in result.output and "Qwen2ForCausalLM" in result.output
    model = load_checkpoint(mixed)
    assert model.fingerprint == fingerprint(mixed) != before
    assert json.loads((mixed / "adapter" / ADAPTER_BASE_FILE).read_text())["base_architectures"] == ["LlamaForCausalLM"]


def test_accepting_an_adapter_that_already_fits_changes_nothing_and_says_so(tmp_path, tiny_checkpoints):
    """A no-op: rewriting the record would change the fingerprint and force a full recompile."""
    own = tmp_path / "own"
    shutil.copytree(tiny_checkpoints("llama"), own)  # its adapter records exactly this base
    before, files = fingerprint(own), file_bytes(own)
    result = CliRunner().invoke(app, ["model", "accept-adapter", str(own)])
    assert result.exit_code == 0, result.output
    assert "already fits" in result.output and "nothing changed" in result.output and before[:16] in result.output
    assert fingerprint(own) == before and file_bytes(own) == files

    plain = tmp_path / "peft-only"  # no record, and nothing in adapter_config.json names another base
    shutil.copytree(tiny_checkpoints("llama"), plain)
    (plain / "adapter" / ADAPTER_BASE_FILE).unlink()
    before, files = fingerprint(plain), file_bytes(plain)
    result = CliRunner().invoke(app, ["model", "accept-adapter", str(plain)])
    assert result.exit_code == 0 and "nothing changed" in result.output, result.output
    assert fingerprint(plain) == before and file_bytes(plain) == files


def test_accepting_a_foreign_adapter_twice_changes_the_fingerprint_once(tmp_path, tiny_checkpoints):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("qwen2"))
    before = fingerprint(mixed)
    assert CliRunner().invoke(app, ["model", "accept-adapter", str(mixed)]).exit_code == 0
    accepted, files = fingerprint(mixed), file_bytes(mixed)
    assert accepted != before
    result = CliRunner().invoke(app, ["model", "accept-adapter", str(mixed)])
    assert result.exit_code == 0 and "nothing changed" in result.output, result.output
    assert fingerprint(mixed) == accepted and file_bytes(mixed) == files


def test_the_environment_override_loads_a_foreign_adapter_with_a_warning(tmp_path, tiny_checkpoints, monkeypatch, caplog):
    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("qwen2"))
    monkeypatch.setenv(ALLOW_ADAPTER_MISMATCH_ENV, "1")
    model = load_checkpoint(mixed)
    assert model.fingerprint == fingerprint(mixed)
    assert "loading anyway" in caplog.text and "Qwen2ForCausalLM" in caplog.text


def test_a_checkpoint_with_its_own_adapter_loads_and_records_its_base(tiny_checkpoints):
    for family in ("llama", "qwen2"):
        root = tiny_checkpoints(family)
        assert adapter_base_mismatch(root) is None
        record = json.loads((root / "adapter" / ADAPTER_BASE_FILE).read_text())
        assert record["base_model_type"] == family


def test_a_night_on_a_checkpoint_with_a_foreign_adapter_is_refused_before_it_writes(tmp_path, tiny_checkpoints, local_store):
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import fact_log_rows, write_fact_log

    mixed = with_adapter_of(tmp_path, tiny_checkpoints("llama"), tiny_checkpoints("qwen2"))
    write_fact_log(fact_log_rows(2, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(mixed), num_shards=2, workers=0)
    with pytest.raises(CheckpointError, match="Qwen2ForCausalLM"):
        run_nightly(spec)
    assert local_store.list("") == []  # no model uploaded, no chunk compiled, nothing published


def test_the_upload_and_the_fingerprint_take_the_same_files(tmp_path, tiny_dir):
    """A stray temp file counts in neither: an uploaded model always has its fingerprint."""
    import shutil

    from engram_core.fingerprint import fingerprint
    from versions.models import checkpoint_files

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = fingerprint(model)
    for name in ("extra.tmp.npy", ".canonical-map.npy.123.abc.tmp", "canonical-map.npy"):
        (model / "engram" / name).write_bytes(b"x")
    assert fingerprint(model) == before
    assert not any(name in f for f in checkpoint_files(model) for name in ("tmp", "canonical-"))


def test_a_load_reports_where_its_seconds_went_and_its_fingerprint_is_the_files(tiny_dir, tmp_path):
    timings: dict[str, float] = {}
    model = load_checkpoint(tiny_dir, timings=timings)
    assert set(timings) == {"imports", "tokenizer", "base", "digest", "to_device", "engram"}
    assert all(seconds >= 0 for seconds in timings.values())
    assert model.fingerprint == fingerprint(tiny_dir)  # hashed on a thread while the model built
    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    (changed / "tokenizer" / "extra.txt").write_text("an ingredient too")
    assert load_checkpoint(changed).fingerprint == fingerprint(changed) != model.fingerprint

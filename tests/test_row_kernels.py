"""The serving overlay's kernel form and its compiled CPU kernels (engram_core/row_kernels.py).

The kernel form must read exactly the bits the add and read forms read, in every table dtype,
keep its pooled index clean, refuse bad input before writing anything, and fall back to the
other forms where it does not apply. The build must survive a killed earlier build, load from
its cache in a new process, and, when it cannot compile, leave the server on the read form.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_core import row_overlay as overlay_module
from engram_core.row_kernels import KernelBuildError, _Kernels
from engram_core.row_overlay import row_map_overlay
from tests.test_properties import as_bits

REPO = Path(__file__).resolve().parents[1]

def _case(seed: int, dtype: torch.dtype, R: int = 700, width: int = 8, B: int = 5):
    """A table, entries for B sequences (sequence 2 has none), and rows (B, 7, 3) that hit some of each
    sequence's rows. Values include -0.0 and the table holds -0.0 rows."""
    g = np.random.default_rng(seed)
    table = torch.from_numpy(g.normal(size=(R, width)).astype(np.float32)).to(dtype)
    table[g.choice(R, 20, replace=False)] = -0.0
    table = torch.nn.Parameter(table, requires_grad=False)
    items = []
    for b in range(B):
        if b == 2:
            continue
        k = int(g.integers(1, 60))
        rows = np.sort(g.choice(R, k, replace=False)).astype(np.int64)
        values = g.normal(0, 3, (k, width)).astype(np.float16)
        values[0, 0] = -0.0
        items.append((b, rows, values))
    hit = {b: r for b, r, _ in items}
    rows = torch.from_numpy(np.stack([
        g.choice(np.concatenate([hit.get(b, np.zeros(0, np.int64))[:8], g.integers(0, R, 8)]), (7, 3)) for b in range(B)]))
    return table, {7: items}, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernel_form_reads_the_same_bits_as_the_add_and_read_forms(row_kernels, dtype):
    table, entries, rows = _case(1, dtype)
    kernel = row_map_overlay(5, entries, {7: table}, kernel=True)
    assert isinstance(kernel.maps[7], overlay_module._KernelMap)
    add = row_map_overlay(5, entries, {7: table}, read_limit=0, kernel=False)
    read = row_map_overlay(5, entries, {7: table}, kernel=False)
    got = kernel.read(7, rows, table)
    assert got.dtype == dtype and got.shape == (*rows.shape, table.shape[1])
    assert torch.equal(as_bits(got), as_bits(add.read(7, rows, table)))
    assert torch.equal(as_bits(got), as_bits(read.read(7, rows, table)))
    assert torch.equal(as_bits(got[2]), as_bits(torch.nn.functional.embedding(rows[2], table)))  # no user: the table
    assert not torch.equal(got, torch.nn.functional.embedding(rows, table))  # the case does hit written rows
    # A decode step reads a non-contiguous slice of the window's rows.
    window = rows[:, -3:]
    assert not window.reshape(5, -1).is_contiguous()
    assert torch.equal(as_bits(kernel.read(7, window, table)), as_bits(add.read(7, window, table)))


def test_the_kernel_form_reads_the_table_as_it_is_now(row_kernels):
    """No copy of the table: one written after the build is read as written, like the add form."""
    table, entries, rows = _case(2, torch.float32)
    kernel = row_map_overlay(5, entries, {7: table}, kernel=True)
    with torch.no_grad():
        table[rows[0, 0]] += 1.5
    want = row_map_overlay(5, entries, {7: table}, read_limit=0, kernel=False).read(7, rows, table)
    assert torch.equal(as_bits(kernel.read(7, rows, table)), as_bits(want))


def test_a_pooled_index_comes_back_clean_and_serves_only_the_new_batch(row_kernels):
    table, entries, rows = _case(3, torch.float32)
    first = row_map_overlay(5, entries, {7: table}, kernel=True)
    index = first.maps[7].index
    assert int((index != 0).sum()) == sum(len(r) for _, r, _ in entries[7])
    del first
    gc.collect()
    assert not bool(index.any())  # cleared where it was marked...
    assert any(t.data_ptr() == index.data_ptr() for t in overlay_module._ZEROED_MAPS._free)  # ...and pooled
    _, entries, rows = _case(4, torch.float32)
    second = row_map_overlay(5, entries, {7: table}, kernel=True)
    assert second.maps[7].index.data_ptr() == index.data_ptr()  # reused
    want = row_map_overlay(5, entries, {7: table}, read_limit=0, kernel=False).read(7, rows, table)
    assert torch.equal(as_bits(second.read(7, rows, table)), as_bits(want))


def test_parts_the_kernel_cannot_read_fall_back_to_the_other_forms_and_mark_nothing(row_kernels):
    table, entries, rows = _case(5, torch.float32)
    cases = {
        "tensors": [(b, torch.from_numpy(r), torch.from_numpy(v)) for b, r, v in entries[7]],
        "int32 rows": [(b, r.astype(np.int32), v) for b, r, v in entries[7]],
        "float32 values": [(b, r, v.astype(np.float32)) for b, r, v in entries[7]],
        "two owners": entries[7] + [(0, entries[7][1][1], entries[7][1][2])],
    }
    for name, items in cases.items():
        gc.collect()
        overlay = row_map_overlay(5, {7: items}, {7: table}, kernel=True)
        assert not isinstance(overlay.maps[7], overlay_module._KernelMap), name
        assert all(not bool(t.any()) for t in overlay_module._ZEROED_MAPS._free), name  # nothing left marked
        reference = row_map_overlay(5, {7: items}, {7: table}, read_limit=0, kernel=False)
        assert torch.equal(as_bits(overlay.read(7, rows, table)), as_bits(reference.read(7, rows, table))), name
        del overlay, reference
    f64 = torch.nn.Parameter(table.detach().to(torch.float64), requires_grad=False)  # a dtype the kernel lacks
    assert not isinstance(row_map_overlay(5, entries, {7: f64}, kernel=True).maps[7], overlay_module._KernelMap)


def test_a_row_out_of_range_is_refused_before_anything_is_marked(row_kernels):
    table, entries, _ = _case(6, torch.float32)
    index = torch.zeros(5, table.shape[0], dtype=torch.int32)
    rows = [None] * 5
    values = [None] * 5
    for b, r, v in entries[7]:
        rows[b], values[b] = r, v
    bad = rows[4].copy()
    bad[-1] = table.shape[0]
    rows[4] = bad
    with pytest.raises(RuntimeError, match=f"sequence 4: row {table.shape[0]} out of range"):
        row_kernels.mark(index, rows, values, table.shape[1])
    assert not bool(index.any())


def test_reads_with_marks_that_do_not_fit_are_refused(row_kernels):
    table, entries, rows = _case(7, torch.float32)
    overlay = row_map_overlay(5, entries, {7: table}, kernel=True)
    marks = overlay.maps[7].marks
    other = torch.zeros(9, 8)
    with pytest.raises(RuntimeError, match="marks are for 5 x 700"):
        row_kernels.read_rows(other, rows.reshape(5, -1).contiguous(), marks)
    with pytest.raises(RuntimeError, match="row out of range"):
        row_kernels.read_rows(table.detach(), torch.full((5, 2), 700, dtype=torch.long), marks)
    with pytest.raises(RuntimeError, match="rows must be a contiguous CPU int64"):
        row_kernels.read_rows(table.detach(), rows.reshape(5, -1).int(), marks)


def test_the_build_outlives_a_killed_build_and_a_new_process_loads_it_from_the_cache(row_kernels, tmp_path):
    """The session's build ran in ENGRAM_KERNEL_CACHE; a new process loads the library from there
    (no compiler run: the build folder of a dead process is ignored) and reads the same bits."""
    root = Path(os.environ["ENGRAM_KERNEL_CACHE"])
    (root / "build-999999999").mkdir(exist_ok=True)  # what a killed build leaves
    (root / "build-999999999" / "lock").write_text("")  # torch's own lock file of that build
    script = (
        "import sys, torch; from engram_core.row_kernels import KERNELS\n"
        "m = KERNELS.load(timeout=120)\n"
        "print(m.__file__)\n"
    )
    env = {**os.environ, "ENGRAM_ROW_KERNELS": "require", "CXX": "/nonexistent/c++"}  # it must not compile
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = Path(done.stdout.strip().splitlines()[-1])
    assert loaded.parent.parent == root and not loaded.parent.name.startswith("build-")


def test_without_a_compiler_the_build_fails_clearly_and_requests_keep_the_read_form(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("ENGRAM_ROW_KERNELS", "auto")
    kernels = _Kernels()
    assert kernels.load(timeout=300) is None
    assert kernels.status().startswith("unavailable: ")
    assert not list((tmp_path / "cache").glob("*/engram_row_kernels_*.so"))  # nothing half-built is trusted
    monkeypatch.setenv("ENGRAM_ROW_KERNELS", "require")
    with pytest.raises(KernelBuildError):
        _Kernels().load(timeout=300)
    monkeypatch.setattr(overlay_module, "KERNELS", kernels)
    table, entries, rows = _case(8, torch.float32)
    overlay = row_map_overlay(5, entries, {7: table})  # default: the kernel form only where loaded
    assert isinstance(overlay.maps[7], overlay_module._ReadMap)


def test_off_builds_nothing_and_a_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("ENGRAM_ROW_KERNELS", "off")
    kernels = _Kernels()
    assert kernels.load() is None and kernels.status() == "off"
    monkeypatch.setenv("ENGRAM_ROW_KERNELS", "fast")
    with pytest.raises(KernelBuildError, match="ENGRAM_ROW_KERNELS='fast': expected one of auto, off, require"):
        _Kernels().load()

"""The compiled step's warm-up is paid once per model and machine: compile workers keep
torch.compile's caches in one folder per model and torch version (pipeline.compile.use_step_cache),
so a second worker process loads the step from there instead of compiling it again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compile import STEP_CACHE_ENV, step_cache_dir

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
from torch._dynamo.utils import counters
from engram_core.compiler import _STEPS, CompileOptions, Fact, compile_facts
from pipeline.compile import CompileWorker

# The step alone (plain_prefix off): what is cached is the same for the prefix forward's compile
# (tests/test_compiler.py compiles that one), and a cold compile takes 100 s or more on a CPU.
worker = CompileWorker(sys.argv[1], CompileOptions(compiled_step=True, plain_prefix=False, facts_per_batch=64))
facts = [Fact(f"user-{u}", f"fact-{k}", trigger, answer) for u in range(3)
         for k, (trigger, answer) in enumerate([("My dentist is Dr.", " Rex"), ("I live in the city of", " Lyon")])]
result = compile_facts(worker.model, facts, worker.options)
print(json.dumps({"ok": result.ok, "facts": len(facts), "cache": str(worker.step_cache),
                  "compiled": [step.compiled for step in _STEPS[worker.model.model].values()],
                  "inductor": dict(counters["inductor"]), "aot_autograd": dict(counters["aot_autograd"])}))
"""


def run_worker(model_dir: Path, cache_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env[STEP_CACHE_ENV] = str(cache_root)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", WORKER, str(model_dir)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_worker_process_loads_the_compiled_step_from_the_first_ones_cache(tiny_dir, tmp_path):
    from engram_core.checkpoint import fingerprint

    first = run_worker(tiny_dir, tmp_path)
    second = run_worker(tiny_dir, tmp_path)
    assert first["cache"] == second["cache"] == str(step_cache_dir(tmp_path, fingerprint(tiny_dir)))
    for run in (first, second):
        assert run["ok"] == run["facts"] and run["compiled"] == [True]
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and first["inductor"].get("fxgraph_cache_hit", 0) == 0
    assert second["inductor"].get("fxgraph_cache_hit", 0) > 0 and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["aot_autograd"].get("autograd_cache_hit", 0) > 0  # the backward graph too
    assert any(Path(first["cache"]).rglob("*.py")), "inductor wrote its compiled code under the model's folder"


def test_the_cache_folder_is_one_per_model_and_torch_version(tmp_path):
    import torch

    a, b = step_cache_dir(tmp_path, "a" * 64), step_cache_dir(tmp_path, "b" * 64)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name == "a" * 16 + "-torch" + torch.__version__.replace("+", "_")


def test_the_nightly_passes_the_cache_folder_to_its_ray_workers(monkeypatch):
    from pipeline.runner import job_runtime_env

    monkeypatch.setenv(STEP_CACHE_ENV, "/mnt/engram-cache")
    assert job_runtime_env()["env_vars"][STEP_CACHE_ENV] == "/mnt/engram-cache"

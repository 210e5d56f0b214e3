"""The nightly's driver and the `engram` CLI start without torch (and transformers): what they
need of the compiler and the checkpoint lives in engram_core.options and engram_core.fingerprint.
A command that needs a model imports torch where it runs."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import json, sys
import jobs.nightly, jobs.spec, jobs.cli, versions.models, pipeline.compile
jobs.cli._register_all()
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""

OLD_PATHS = """
import json
from engram_core.compiler import CompileOptions as A, Fact as C
from engram_core.options import CompileOptions as B, Fact as D
from engram_core.checkpoint import fingerprint as f, check_adapter_base as h
from engram_core.fingerprint import fingerprint as g, check_adapter_base as i
print(json.dumps([A is B, C is D, f is g, h is i]))
"""


def probe(code: str):
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_driver_and_the_cli_import_no_torch():
    assert probe(DRIVER) == {"torch": False, "transformers": False}


def test_the_old_import_paths_name_the_same_objects():
    assert probe(OLD_PATHS) == [True, True, True, True]


FAKE_SKLEARN = {
    "sklearn/__init__.py": "",
    "sklearn/metrics.py": "def roc_curve(y, p):\n    return 'roc from sklearn'\n",
}

DEFERRED = """
import json, sys
import transformers.utils as utils
from engram_core.hf_compat import deferred_sklearn
from engram_core.checkpoint import load_checkpoint
original = utils.is_sklearn_available
found = original()
with deferred_sklearn():
    inside = utils.is_sklearn_available()
restored = utils.is_sklearn_available is original
em = load_checkpoint(sys.argv[1])
import transformers.generation.candidate_generator as generation
after_load = {"sklearn_imported": "sklearn" in sys.modules, "generation_sees": generation.is_sklearn_available(),
              "utils_restored": utils.is_sklearn_available is original}
print(json.dumps({"found": found, "inside": inside, "restored": restored, **after_load,
                  "roc": generation.roc_curve([0, 1], [0.2, 0.8]) if hasattr(generation, "roc_curve") else None}))
"""


def test_a_model_load_does_not_import_scikit_learn_and_leaves_it_available(tmp_path, tiny_dir):
    """transformers up to 5.17 imports scikit-learn with its generation code when it is installed
    (1.5 s of a compile worker's start on the device); a load defers it to its one use. A stand-in
    scikit-learn package is put on the path, so the test runs whether or not the real one is here."""
    for name, text in FAKE_SKLEARN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = subprocess.run([sys.executable, "-c", DEFERRED, str(tiny_dir)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["found"] is True and got["inside"] is False and got["restored"] is True
    assert got["sklearn_imported"] is False  # not by the load
    assert got["generation_sees"] is True and got["utils_restored"] is True  # assisted generation keeps it
    assert got["roc"] == "roc from sklearn"  # imported where it is used

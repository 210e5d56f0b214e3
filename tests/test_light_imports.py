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

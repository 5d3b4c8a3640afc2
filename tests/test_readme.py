"""Every README code block that can run offline runs, as written, against a small built dataset.

Blocks in ```python or ```bash run in a folder holding `fdh_out/` (a dataset written by the
project's writer, tests/jobs_dataset.py); a block preceded by `<!-- no-test -->` is skipped (it
needs the network, YFCC100M, a GPU or another project). Plain ``` blocks are output, not code.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs_dataset import build_dataset

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- no-test -->[ \t]*\n)?[ \t]*```(python|bash)\n(.*?)\n[ \t]*```", re.S)


def readme_blocks() -> list[tuple[str, str, bool]]:
    """(language, code, runnable) per fenced python / bash block of README.md, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(language, code, not skip) for skip, language, code in BLOCK.findall(text)]


RUNNABLE = [(language, code) for language, code, runnable in readme_blocks() if runnable]


def test_the_readme_has_runnable_and_skipped_blocks():
    blocks = readme_blocks()
    assert len(RUNNABLE) >= 6 and any(not runnable for *_, runnable in blocks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    built = build_dataset(tmp_path_factory.mktemp("built"))
    shutil.copytree(built, root / "fdh_out")
    return root


@pytest.mark.parametrize("language,code", RUNNABLE,
                         ids=[f"{language}-{index}" for index, (language, _) in enumerate(RUNNABLE)])
def test_readme_block_runs(workdir, language, code):
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = ([sys.executable, "-c", code] if language == "python"
               else ["bash", "-euo", "pipefail", "-c", code])
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README {language} block failed:\n{code}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"README {language} block printed nothing:\n{code}"

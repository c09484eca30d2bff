"""The commands in the shell blocks of the README and the local-use docs run as written after the README's set-up:
a venv in .venv that is never activated, so its programs are called by path (.venv/bin/...) and nothing
of it is on PATH."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO

VENV_BIN = Path(sys.executable).parent
SYSTEM = {"python3", "bash", "cd", "export", "source", "aws", "gcloud"}  # outside the venv by design
DOCS = ["README.md", "docs/SWEEPS.md", "docs/TRAINING.md", "docs/DATA.md"]


def shell_commands(markdown: str) -> list[str]:
    """Every command of the ```bash blocks: continuation lines joined, comments dropped, `&&` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def program(command: str) -> str:
    words = shlex.split(command.rstrip("&").strip())
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words[0]


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_name_the_venvs_programs(doc):
    commands = shell_commands((REPO / doc).read_text())
    assert commands
    wrong = []
    for command in commands:
        prog = program(command)
        if prog in SYSTEM:
            continue
        if not prog.startswith(".venv/bin/") or not (VENV_BIN / prog.removeprefix(".venv/bin/")).is_file():
            wrong.append(command)
    assert not wrong, f"{doc}: commands that do not run as written after the set-up:\n" + "\n".join(wrong)

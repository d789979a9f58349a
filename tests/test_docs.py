"""Docs that cannot rot: every `dsee` / `make` / `python scripts/...` command in the README and in
docs/ (fenced bash blocks) runs in its smoke form, and the pages hold together (size, links)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FAST

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNERS = ("dsee ", "make ", "python scripts/", "torchrun ")
TIMEOUT = 300


def doc_commands() -> list[tuple[str, int, str]]:
    """(page, line, command) for each command line of a fenced bash block (continuations joined,
    trailing comments dropped)."""
    found = []
    for page in PAGES:
        in_bash, pending, start = False, "", 0
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
                continue
            if not in_bash:
                continue
            text = re.split(r"\s+#\s", line, maxsplit=1)[0].rstrip() if " #" in line else line.rstrip()
            if not pending:
                start = number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            command, pending = (pending + text).strip(), ""
            if command.startswith(RUNNERS):
                found.append((str(page.relative_to(REPO)), start, command))
    return found


COMMANDS = doc_commands()


def smoke_forms(command: str, fixtures: dict[str, Path]) -> list[list[str]]:
    """What runs for a shown command: dsee train composed and validated (--plan), make dry-run (and a
    reproduce target's sweep planned), dsee report / eval on the fixtures, scripts' --help."""
    words = shlex.split(command)
    if words[0] == "torchrun":  # the run it starts, as dsee would start it
        words = ["dsee", *words[words.index("dsee_cli") + 1:]]
    if words[0] == "python":
        return [[sys.executable, str(REPO / words[1]), "--help"]]  # scripts/ of this checkout
    if words[0] == "make":
        forms = [["make", "-n", "-f", str(REPO / "Makefile"), *words[1:]]]
        settings = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        for target in (w for w in words[1:] if w.startswith("reproduce-")):
            forms.append(["dsee", "train", "-m", f"experiment={target.removeprefix('reproduce-')}",
                          f"profile={settings.get('PROFILE', 'paper')}", "--plan"])
        return forms
    sub, rest = words[1], words[2:]
    if sub == "train":
        shown = {"--plan", "--cfg", "--help", "-h"} & set(rest)
        return [["dsee", "train", *rest, *([] if shown else ["--plan"])]]
    if sub in ("report", "eval"):
        where = fixtures["llm-run" if "<llm-run>" in rest[0] else "run"] if sub == "eval" else fixtures["sweep"]
        return [["dsee", sub, str(where), *rest[1:]]]
    return [["dsee", sub, *rest]]


def _run(argv: list[str], cwd: Path, capsys) -> tuple[int, str]:
    """dsee commands in this process (Hydra's own --cfg / --help in a subprocess), others as they are."""
    if argv[0] == "dsee" and not {"--cfg", "--help", "-h"} & set(argv):
        from dsee_cli.cli import main

        capsys.readouterr()
        code = main(argv[1:])
        out = capsys.readouterr()
        return code, out.out[-1500:] + out.err[-1500:]
    if argv[0] == "dsee":
        argv = [sys.executable, "-m", "dsee_cli", *argv[1:]]
    out = subprocess.run(argv, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=TIMEOUT)
    return out.returncode, out.stdout[-1500:] + out.stderr[-1500:]


MINI_ENV = {"DSEE_MINI_MODEL": "/path/to/all-MiniLM-L6-v2", "DSEE_GLUE_DIR": "/path/to/glue_data"}


def _env(tmp: Path) -> dict[str, str]:
    return {**MINI_ENV, **os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "DSEE_CACHE": str(tmp / ".cache"), "COLUMNS": "100"}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny run (exported, pruned), a tiny decoder run and a two-seed sweep, made once."""
    tmp = tmp_path_factory.mktemp("docs")
    runs = {
        "run": [*FAST, "export=true", "hydra.run.dir=outputs/run"],
        "llm-run": ["task=wikitext2", "profile=smoke", "trainer.threads=1", "trainer.max_steps=2", "export=true",
                    "hydra.run.dir=outputs/llm-run"],
        "sweep": ["-m", *FAST, "seed=1,2", "name=docs", "trainer.max_steps=2"],
    }
    for args in runs.values():
        out = subprocess.run([sys.executable, "-m", "dsee_cli", "train", *args], cwd=tmp, env=_env(tmp),
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return {"run": tmp / "outputs/run", "llm-run": tmp / "outputs/llm-run", "sweep": tmp / "multirun/docs",
            "cwd": tmp}


def test_the_pages_hold_together():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 10_000, "the README is the newcomer's page: keep it under ~10 KB"
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"{page.name} is not in the README's table of pages"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.relative_to(REPO)} links to a missing {target}"
    assert len(COMMANDS) >= 40 and {p for p, _, _ in COMMANDS} >= {"README.md", "docs/llm.md", "docs/scale.md"}
    # CI runs the README's test command
    assert "make test-all" in readme and "make test-all" in (REPO / ".ci/run").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("page, line, command", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_every_shown_command_runs_in_its_smoke_form(fixtures, page, line, command, monkeypatch, capsys):
    monkeypatch.chdir(fixtures["cwd"])
    for key, value in MINI_ENV.items():  # the mini profile names its model and data by environment variable
        monkeypatch.setenv(key, os.environ.get(key, value))
    for argv in smoke_forms(command, fixtures):
        code, output = _run(argv, fixtures["cwd"], capsys)
        assert code == 0, f"{page}:{line}: `{command}` no longer runs (as `{shlex.join(argv)}`):\n{output}"

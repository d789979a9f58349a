"""Datasets from the Hugging Face Hub, read as Parquet files.

``datasets`` 4 and later refuse loading-script repositories, and the GEM data-to-text sets
(E2E, WebNLG, DART) are such repositories. Their Parquet form lives on the Hub's export
branch ``refs/convert/parquet`` (``<config>/<split>/0000.parquet``); GLUE is Parquet in its own
repository (``<config>/<split>-00000-of-00001.parquet``). We list the split's files and read
them with the ``parquet`` builder, which needs no code from the repository.

Where the files come from is one function, :func:`hub_root`: ``hf://datasets/<repo>@<revision>``,
or with ``DSEE_HUB_MIRROR=/dir`` the folder ``/dir/<repo>/<revision>`` holding the same files (for
clusters whose compute nodes have no internet, and for the tests).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

from dsee_cli.core.models import hub_reachable
from dsee_cli.errors import DSEEError

PARQUET_EXPORT = "refs/convert/parquet"
# The layouts a split's files have: the export's, a repository's own (GLUE), the export's older one.
SPLIT_PATTERNS = ("{config}/{split}/*.parquet", "{config}/{split}-*.parquet", "{config}/*-{split}.parquet")


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str
    config: str

    def describe(self) -> str:
        return f"{self.repo} (revision {self.revision}, config {self.config})"


def with_overrides(source: HubSource, repo: str | None, revision: str | None, config: str | None) -> HubSource:
    """task.hub_repo / task.hub_revision / task.hub_config: a fork, a pinned commit, another config."""
    return replace(source, repo=repo or source.repo, revision=revision or source.revision,
                   config=config or source.config)


def hub_root(source: HubSource) -> str:
    mirror = os.environ.get("DSEE_HUB_MIRROR")
    if mirror:
        return str(Path(mirror) / source.repo / source.revision)
    return f"hf://datasets/{source.repo}@{quote(source.revision, safe='')}"


def uses_mirror() -> bool:
    return bool(os.environ.get("DSEE_HUB_MIRROR"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


_CONNECTION_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "ReadTimeout", "TimeoutError",
                      "NameResolutionError", "MaxRetryError", "OfflineModeIsEnabled", "gaierror"}


def is_connection_error(exc: BaseException | None) -> bool:
    """Whether this failure (or one it was raised from) is the network's rather than the data's."""
    seen = 0
    while exc is not None and seen < 10:
        network = isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))
        if network or type(exc).__name__ in _CONNECTION_ERRORS:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def offline_error(what: str, source: HubSource, local_way: str) -> DSEEError:
    return DSEEError(
        f"Cannot load {what} from the Hub ({source.describe()}): the Hub is unreachable (or HF_HUB_OFFLINE=1). "
        f"{local_way} Or download the Parquet files once where there is a connection (`hf download "
        f"{source.repo} --repo-type dataset --revision {source.revision} --local-dir "
        f"<mirror>/{source.repo}/{source.revision}`) and set DSEE_HUB_MIRROR=<mirror>."
    )


def read_error(what: str, source: HubSource, root: str, exc: BaseException, local_way: str) -> DSEEError:
    return DSEEError(
        f"Could not read {what} from {source.describe()} at {root}: {type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}. The Hub was reachable, so the dataset's files are not "
        f"what dsee-cli expects; point at a fork or a pinned commit with task.hub_repo=..., task.hub_revision=..., "
        f"task.hub_config=..., or use local files: {local_way}"
    )


def _split_files(root: str, config: str, split: str) -> list[str]:
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    for pattern in SPLIT_PATTERNS:
        files = sorted(fs.glob(f"{base}/{pattern.format(config=config, split=split)}"))
        if files:
            return [fs.unstrip_protocol(f) if "://" in root else f for f in files]
    configs = sorted(Path(p).name for p in fs.ls(base, detail=False)) if fs.exists(base) else []
    raise FileNotFoundError(f"no Parquet files for config {config!r}, split {split!r} (looked for "
                            f"{', '.join(p.format(config=config, split=split) for p in SPLIT_PATTERNS)}; "
                            f"top-level entries there: {', '.join(configs) or 'none'})")


def read_splits(source: HubSource, splits: list[str], what: str, local_way: str, first_file: bool = False
                ) -> dict[str, list[dict]]:
    """Rows of each split, as dicts of the Parquet columns (``first_file``: of its first file only, as
    C4's one validation shard). Errors say whether the network or the data failed: only a
    connection failure (or HF_HUB_OFFLINE) gives the offline hint."""
    if not uses_mirror() and (_offline() or not hub_reachable()):
        raise offline_error(what, source, local_way)
    import datasets

    root = hub_root(source)
    try:
        files = {split: _split_files(root, source.config, split)[:1 if first_file else None]
                 for split in dict.fromkeys(splits)}
        ds = datasets.load_dataset("parquet", data_files=files)
        return {split: list(ds[split]) for split in files}
    except Exception as exc:
        if not uses_mirror() and is_connection_error(exc):
            raise offline_error(what, source, local_way) from exc
        raise read_error(what, source, root, exc, local_way) from exc


def read_file(source: HubSource, path: str, what: str, local_way: str) -> list[dict]:
    """Rows of one named JSON-lines file of a repository (``.json.gz`` read as is), as C4's
    ``en/c4-train.00000-of-01024.json.gz``, which Wanda and SparseGPT calibrate on."""
    if not uses_mirror() and (_offline() or not hub_reachable()):
        raise offline_error(what, source, local_way)
    import datasets

    root = hub_root(source)
    try:
        return list(datasets.load_dataset("json", data_files={"train": f"{root}/{path}"})["train"])
    except Exception as exc:
        if not uses_mirror() and is_connection_error(exc):
            raise offline_error(what, source, local_way) from exc
        raise read_error(what, source, root, exc, local_way) from exc


def require_columns(rows: list[dict], columns: tuple[str, ...], what: str, source: HubSource, split: str) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if rows and missing:
        raise DSEEError(f"{what} from {source.describe()}, split {split!r}, has no column(s) {missing}; its columns "
                        f"are {sorted(present)}. Point task.hub_repo / task.hub_revision / task.hub_config at the "
                        f"layout dsee-cli reads (see the README's table of tasks), or use local files.")

"""The model folder's history: the last accepted models, kept as plain safetensors + card.

    models/model.safetensors, models/model.json     the current model (what the service serves)
    models/.accepted.json                           when and how it was installed (by fashion-models)
    models/history/<version>/model.safetensors      an earlier model, exactly as it was served
    models/history/<version>/model.json
    models/history/<version>/history.json           {"version", "accepted_at", "archived_at"}
    models/history/<version>/*.png                  its plots, when its card names them (``plots``)

``<version>`` is the first 12 hex digits of the weights' SHA-256, as the service reports it.
``fashion-models promote`` archives the current model here before installing another one
(``install``), ``rollback`` installs the most recently archived one, and the service can be pinned
to any of them (``MODEL_VERSION``). Each archive is written into a temporary folder and renamed
into place, so ``history/<version>/`` is either absent or complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fashion.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    commit_files,
    read_card,
    sha256_bytes,
    write_file_atomically,
)
from fashion.policy import VERSION_PATTERN

HISTORY_DIR = "history"
ACCEPTED_FILE = ".accepted.json"
ENTRY_FILE = "history.json"
DEFAULT_KEEP = 5


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def version_of(card: dict) -> str:
    weights = card.get("weights") if isinstance(card, dict) else None
    sha = weights.get("sha256") if isinstance(weights, dict) else None
    if not isinstance(sha, str) or len(sha) < 12:
        raise CheckpointError("the model card names no weights hash")
    return sha[:12]


def history_dir(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / HISTORY_DIR


@dataclass(frozen=True)
class Entry:
    """One model of the folder: the current one or an archived one."""

    version: str
    path: Path
    card: dict
    current: bool
    accepted_at: str | None = None
    archived_at: str | None = None


def read_pair(model_dir: str | os.PathLike) -> tuple[bytes, bytes, dict]:
    """(weights bytes, card bytes, card) of a model folder whose card's hash matches its weights."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    card_data = (model_dir / CARD_FILE).read_bytes()
    try:
        weights = (model_dir / WEIGHTS_FILE).read_bytes()
    except OSError as error:
        raise CheckpointError(f"the weights {model_dir / WEIGHTS_FILE} cannot be read: {error.strerror}") from None
    version_of(card)  # the card names a hash at all
    if sha256_bytes(weights) != card["weights"]["sha256"]:
        raise CheckpointError(f"the weights in {model_dir} do not match their card's SHA-256")
    return weights, card_data, card


def read_plots(model_dir: str | os.PathLike, card: dict) -> dict[str, bytes]:
    """The plots beside a model that its card vouches for (``plots``: file name -> SHA-256), by name.

    A plot that is missing or whose bytes differ from the card's hash is left out, and so is a
    name that is not a plain file name (a card is data from wherever the model came from)."""
    model_dir, plots = Path(model_dir), {}
    named = card.get("plots") if isinstance(card, dict) else None
    for name, sha in (named if isinstance(named, dict) else {}).items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or not name.endswith(".png"):
            continue
        try:
            data = (model_dir / name).read_bytes()
        except OSError:
            continue
        if sha256_bytes(data) == sha:
            plots[name] = data
    return plots


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def current_entry(model_dir: str | os.PathLike) -> Entry | None:
    """The current model's entry, or None when the folder holds no readable card."""
    model_dir = Path(model_dir)
    try:
        card = read_card(model_dir)
        version = version_of(card)
    except CheckpointError:
        return None
    accepted = _read_json(model_dir / ACCEPTED_FILE)
    accepted_at = accepted.get("accepted_at") if accepted.get("version") == version else None
    return Entry(version, model_dir, card, True, accepted_at=accepted_at)


def archived_entries(model_dir: str | os.PathLike) -> list[Entry]:
    """The archived models, most recently archived first (unreadable folders are skipped)."""
    found = []
    root = history_dir(model_dir)
    if not root.is_dir():
        return []
    for folder in root.iterdir():
        if not VERSION_PATTERN.fullmatch(folder.name) or not folder.is_dir():
            continue
        try:
            card = read_card(folder)
            if version_of(card) != folder.name:
                continue
        except CheckpointError:
            continue
        meta = _read_json(folder / ENTRY_FILE)
        found.append(Entry(folder.name, folder, card, False, meta.get("accepted_at"), meta.get("archived_at")))
    return sorted(found, key=lambda entry: entry.archived_at or "", reverse=True)


def find(model_dir: str | os.PathLike, version: str) -> Entry | None:
    """The archived model ``version``, or the current one when it is that version."""
    for entry in archived_entries(model_dir):
        if entry.version == version:
            return entry
    current = current_entry(model_dir)
    return current if current is not None and current.version == version else None


def archive_current(model_dir: str | os.PathLike, when: str | None = None) -> Entry | None:
    """Copy the current model into ``history/<version>/`` (complete or not at all); None when there is none.

    An already archived version gets a new ``archived_at`` only (its files are the same bytes)."""
    model_dir = Path(model_dir)
    current = current_entry(model_dir)
    if current is None:
        return None
    weights, card_data, card = read_pair(model_dir)
    plots = read_plots(model_dir, card)
    when = when or now()
    meta = {"version": current.version, "accepted_at": current.accepted_at, "archived_at": when}
    meta_bytes = (json.dumps(meta, indent=2) + "\n").encode()
    target = history_dir(model_dir) / current.version
    if (target / CARD_FILE).is_file():
        write_file_atomically(target / ENTRY_FILE, meta_bytes)
        return Entry(current.version, target, card, False, current.accepted_at, when)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{current.version}.", suffix=".tmp-write"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide it from a service running as another user
        for name, data in plots.items():
            write_file_atomically(staging / name, data)
        commit_files(staging, weights, card_data)
        write_file_atomically(staging / ENTRY_FILE, meta_bytes)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Entry(current.version, target, card, False, current.accepted_at, when)


def prune(model_dir: str | os.PathLike, keep: int) -> list[str]:
    """Delete archived models beyond the ``keep`` most recently archived; return the deleted versions."""
    removed = []
    for entry in archived_entries(model_dir)[keep:]:
        # Renamed out of the way first, so a reader never finds a half-deleted folder under a version name.
        doomed = entry.path.with_name(f".{entry.version}.tmp-delete")
        with contextlib.suppress(OSError):
            os.replace(entry.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(entry.version)
    return removed


def install(
    model_dir: str | os.PathLike,
    weights: bytes,
    card_data: bytes,
    how: str,
    keep: int = DEFAULT_KEEP,
    plots: dict[str, bytes] | None = None,
) -> None:
    """Archive the current model, then commit ``weights`` + ``card_data`` (+ ``plots``) as the current one, then prune.

    The commit is fashion.checkpoint's (weights first, card last, signals held), so the service's
    hot reload sees the old pair or the new one, never a mix. The plots are written before it, as
    training writes them, and the replaced model's plots that the new card does not name are removed
    after it, so the folder never keeps another model's curves beside a card."""
    model_dir = Path(model_dir)
    plots = plots or {}
    when = now()
    archive_current(model_dir, when)
    current = current_entry(model_dir)
    stale = set(read_plots(model_dir, current.card)) - set(plots) if current is not None else set()
    for name, data in plots.items():
        write_file_atomically(model_dir / name, data)
    commit_files(model_dir, weights, card_data)
    for name in stale:
        with contextlib.suppress(OSError):
            (model_dir / name).unlink()
    version = sha256_bytes(weights)[:12]
    accepted = {"version": version, "accepted_at": when, "how": how}
    write_file_atomically(model_dir / ACCEPTED_FILE, (json.dumps(accepted, indent=2) + "\n").encode())
    prune(model_dir, keep)

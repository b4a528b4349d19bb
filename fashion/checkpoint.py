"""Model files: safetensors weights plus a JSON model card, written atomically, loaded verified.

A model directory holds ``model.safetensors`` (weights only, no pickle) and ``model.json``
(the card: architecture, classes, preprocessing, metrics and the weights' SHA-256). Writes go
to temporary files in the same directory, are fsynced, then renamed over the final names,
weights first and card last, with Ctrl-C and SIGTERM held back while the two renames run. A
reader checks the card's hash against the weights, so it never serves a mismatched pair.

Two renames are not one atomic step: a SIGKILL (or a reader) landing between them sees the new
weights beside the old card. So the old weights are hard-linked to ``.model.previous.safetensors``
before the commit and removed after it; a loader whose card does not match ``model.safetensors``
but matches that file loads it, which is the previous model, untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from fashion.contract import ModelConfig, build_model, contract_summary
from fashion.trust import DETECTOR_PREFIX, Judge, TrustConfig, build_detector, split_state

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
PREVIOUS_WEIGHTS_FILE = ".model.previous.safetensors"
CARD_FORMAT = 1
MODEL_NAME = "fashion-mnist"


class CheckpointError(RuntimeError):
    """A model directory that cannot be served, with the reason in words."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_temporary(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fsynced temporary file beside ``path``; return the temporary path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp-write")
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes 0600 files; a model is read by a service that may run as another user
            # (the api container reads what the train container wrote), so give it the usual 0644.
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new complete file, never a part."""
    os.replace(_write_temporary(path, data), path)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends, so a commit is never cut between its renames."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deferred = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    model: nn.Module, card: dict, output_dir: str | os.PathLike, detector: nn.Module | None = None
) -> dict:
    """Atomically write weights (with the not-a-garment ``detector``'s, if any) and card into
    ``output_dir``; return the card as written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if detector is not None:
        tensors.update(
            {DETECTOR_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in detector.state_dict().items()}
        )
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    card = {
        "format": CARD_FORMAT,
        "name": MODEL_NAME,
        **card,
        **contract_summary(),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(weights), "bytes": len(weights)},
    }
    commit_files(output_dir, weights, card_bytes(card))
    return card


def card_bytes(card: dict) -> bytes:
    """The card as written to ``model.json``."""
    return (json.dumps(card, indent=2, sort_keys=False) + "\n").encode()


def commit_files(output_dir: str | os.PathLike, weights: bytes, card: bytes) -> None:
    """Install a weights + card pair in ``output_dir`` as one commit (see the module's docstring).

    Used by ``save_checkpoint`` and by ``fashion-models`` (which installs a model's exact bytes,
    so its hash and card are the ones that were validated)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp_weights = _write_temporary(output_dir / WEIGHTS_FILE, weights)
    try:
        tmp_card = _write_temporary(output_dir / CARD_FILE, card)
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        raise
    previous = _keep_previous_weights(output_dir)
    with _signals_deferred():
        os.replace(tmp_weights, output_dir / WEIGHTS_FILE)
        os.replace(tmp_card, output_dir / CARD_FILE)
        _fsync_dir(output_dir)
    if previous is not None:
        previous.unlink(missing_ok=True)


def _keep_previous_weights(output_dir: Path) -> Path | None:
    """Keep the current weights reachable under PREVIOUS_WEIGHTS_FILE until the commit is done."""
    current = output_dir / WEIGHTS_FILE
    if not current.exists():
        return None
    previous = output_dir / PREVIOUS_WEIGHTS_FILE
    tmp = output_dir / f".{PREVIOUS_WEIGHTS_FILE}.tmp-link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(current, tmp)
    except OSError:  # a file system without hard links: pay for a copy instead
        write_file_atomically(previous, current.read_bytes())
    else:
        os.replace(tmp, previous)
    return previous


def read_card(model_dir: str | os.PathLike) -> dict:
    """The model card of ``model_dir``, or CheckpointError."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no model card at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"the model card {path} cannot be read: {error}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"the model card {path} is not a JSON object")
    return card


def _previous_weights_matching(model_dir: Path, sha256: str) -> bytes | None:
    """The previous weights, when a commit was cut (or is under way) between its two renames."""
    try:
        weights = (model_dir / PREVIOUS_WEIGHTS_FILE).read_bytes()
    except OSError:
        return None
    return weights if sha256_bytes(weights) == sha256 else None


def load_checkpoint(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from ``model_dir`` in eval mode on ``device``, after verifying it.

    Refuses (CheckpointError) a card whose hash does not match the weights, whose classes,
    input size or normalization differ from the shared contract, or whose architecture the
    weights do not fit.
    """
    model, card, _ = load_judged(model_dir, device)
    return model, card


def load_judged(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict, Judge]:
    """load_checkpoint, plus the Judge (fashion.trust) that the card's trust section and the
    detector's weights make; a card and weights that disagree about the detector are refused too."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    weights_info = card.get("weights")
    if not isinstance(weights_info, dict) or "sha256" not in weights_info:
        raise CheckpointError("the model card names no weights hash")
    weights_path = model_dir / WEIGHTS_FILE
    try:
        weights = weights_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"the weights {weights_path} cannot be read: {error.strerror}") from None
    actual = sha256_bytes(weights)
    if actual != weights_info["sha256"]:
        weights = _previous_weights_matching(model_dir, weights_info["sha256"]) or weights
        actual = sha256_bytes(weights)
    if actual != weights_info["sha256"]:
        raise CheckpointError(
            f"the weights' SHA-256 {actual[:12]}… does not match the card's {str(weights_info['sha256'])[:12]}…"
        )
    expected = contract_summary()
    for key, value in expected.items():
        if card.get(key) != value:
            raise CheckpointError(f"the card's {key} {card.get(key)!r} differ from the shared contract's {value!r}")
    try:
        config = ModelConfig.from_dict(card.get("architecture") or {})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the card's architecture is invalid: {error}") from None
    try:
        state = load_safetensors(weights)
    except Exception as error:
        raise CheckpointError(f"the weights file is not valid safetensors: {error}") from None
    state, detector_state = split_state(state)
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:2]
        raise CheckpointError(f"the weights do not fit the card's architecture: {' '.join(first)}") from None
    return model.to(device).eval(), card, _judge(card, detector_state).to(torch.device(device))


def _judge(card: dict, detector_state: dict) -> Judge:
    try:
        trust = TrustConfig.from_card(card)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"the card's trust section is invalid: {error}") from None
    if trust.detector_hidden is None:
        if detector_state:
            raise CheckpointError("the weights hold a detector that the card's trust section does not describe")
        return Judge(trust)
    detector = build_detector(trust.detector_hidden)
    try:
        detector.load_state_dict(detector_state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:2]
        raise CheckpointError(
            f"the detector's weights do not fit the card's trust section: {' '.join(first)}"
        ) from None
    return Judge(trust, detector)

"""The served model: loaded verified, warmed up, swapped atomically when a new one is committed.

Each Flask app owns one ``ModelRunner``, reachable as ``app.extensions["model_runner"]``
(``service.web.runner_of(app)``); there is no module-level model. Under gunicorn every worker
builds its own app after the fork, so each worker loads and warms up its own copy (a few
MB) while torch's code pages, imported by the master, stay shared.

Hot reload: at most every ``reload_interval`` seconds a request stats the two model files
(``maybe_reload``). When they changed, the new pair is loaded with the same verification as
at start (hash, contract, architecture) and warmed up, and only then swapped in with one
reference assignment. A pair caught mid-commit (new weights, old card) fails the hash check
and is not served; the old model keeps answering, and the next change of the files (the
card's rename) triggers another try.

Validation: a verified pair is then scored on the probe set (``fashion.probe.validate_candidate``)
before it may be served. A refused candidate leaves the previous model serving and is reported
(``candidate``: the log, ``/model``, ``/readyz``'s warning, ``rejection_observer`` for the metric).
A worker that has no model in memory (start-up, or a worker gunicorn recycled after
``max_requests`` while a refused candidate sits in the folder) falls back to the most recently
archived model in ``history/`` that passes (fashion.history), so recycling does not take a
service down; with nothing to fall back on it is not ready, with the reason. ``pin``
(``MODEL_VERSION``) serves one version only, from ``history/<version>/`` or the folder itself.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fashion.checkpoint import CARD_FILE, WEIGHTS_FILE, CheckpointError, load_judged
from fashion.contract import INPUT_SHAPE, NUM_CLASSES
from fashion.history import HISTORY_DIR, archived_entries
from fashion.probe import CandidateRejected, ProbeError, ValidationPolicy, validate_candidate
from fashion.trust import Judge, Verdicts
from service import batching
from service.web import ServiceError

log = logging.getLogger(__name__)


def _files_signature(model_dir: Path) -> tuple | None:
    """A cheap fingerprint of the model files (inode, size, mtime); None when one is missing."""
    try:
        card, weights = os.stat(model_dir / CARD_FILE), os.stat(model_dir / WEIGHTS_FILE)
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (card, weights))


class DirectMLP:
    """An MLP's eval-mode arithmetic as plain ``F.linear``/``relu_`` calls on its own tensors.

    For one image the forward pass is three matrix-vector products whose cost is reading the
    weights (2.7 MB for the shipped model) plus the Python around each call; calling the ops
    directly skips Flatten, Dropout (the identity in eval mode) and nn.Module's call machinery.
    ``F.linear`` on the layer's own weight and bias is what ``nn.Linear.forward`` calls, so the
    logits are the modules' own, bit for bit (tests/test_service_unit.py compares them).
    """

    def __init__(self, linears: list[nn.Linear], relus: list[bool]) -> None:
        self.steps = [
            (layer.weight.detach(), layer.bias.detach(), relu) for layer, relu in zip(linears, relus, strict=True)
        ]

    @classmethod
    def of(cls, model: nn.Module) -> DirectMLP | None:
        """The direct form of ``model`` when it is an MLP in eval mode (Flatten, then Linear layers
        each optionally followed by ReLU, with Dropouts anywhere); else None."""
        if not isinstance(model, nn.Sequential) or model.training:
            return None
        layers = [layer for layer in model if not isinstance(layer, nn.Dropout)]
        if not layers or not isinstance(layers[0], nn.Flatten) or not isinstance(layers[-1], nn.Linear):
            return None
        linears, relus = [], []
        for layer in layers[1:]:
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                linears.append(layer)
                relus.append(False)
            elif isinstance(layer, nn.ReLU) and linears and not relus[-1]:
                relus[-1] = True
            else:
                return None
        return cls(linears, relus)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalized [N, 1, 28, 28] inputs -> the model's logits [N, 10]."""
        x = inputs.reshape(len(inputs), -1)
        for weight, bias, relu in self.steps:
            x = F.linear(x, weight, bias)
            if relu:
                x.relu_()
        return x


@dataclass(frozen=True)
class LoadedModel:
    """One verified, warmed-up model; immutable, so a request holding it sees one consistent model."""

    model: nn.Module
    card: dict
    device: torch.device
    signature: tuple | None
    judge: Judge = None  # calibration and the not-a-garment detector (fashion.trust); neutral when None
    load_seconds: float = 0.0  # read + verify + warm-up + validation; exported as fashion_model_load_seconds
    validation: dict | None = None  # the probe's {"accuracy", "agreement", "seconds"} for this model
    source: str = ""  # the folder it was loaded from (MODEL_DIR, or a history/<version>/ folder)

    @property
    def sha256(self) -> str:
        return self.card["weights"]["sha256"]

    @property
    def version(self) -> str:
        return self.sha256[:12]

    def __post_init__(self) -> None:
        if self.judge is None:
            object.__setattr__(self, "judge", Judge.neutral())
        # build_model returns an nn.Sequential; predict calls an MLP's arithmetic directly (DirectMLP),
        # any other model's layers one by one.
        object.__setattr__(self, "direct", DirectMLP.of(self.model))
        object.__setattr__(self, "layers", tuple(self.model) if isinstance(self.model, nn.Sequential) else None)
        # {"name", "version", "sha256"} as JSON, in every answer: written once per model, not per request.
        identity = {"name": self.card.get("name"), "version": self.version, "sha256": self.sha256}
        object.__setattr__(self, "identity_json", json.dumps(identity, separators=(",", ":")))

    def predict(self, batch: torch.Tensor) -> Verdicts:
        """[N, 1, 28, 28] normalized float inputs -> the [N, 10] softmax probabilities on the CPU, with
        each row's calibrated confidence and, when it should not be trusted, why (fashion.trust)."""
        with torch.inference_mode():
            inputs = x = batch.to(self.device, non_blocking=True)
            if self.direct is not None:
                x = self.direct(x)
            elif self.layers is None:
                x = self.model(x)
            else:
                # Sequential's forward without nn.Module.__call__'s hook machinery, which costs
                # about as much as the arithmetic itself for one 28x28 image. Same ops, same result.
                for layer in self.layers:
                    x = layer.forward(x)
            return self.judge.judge(inputs, x)


class ModelRunner:
    """Holds the served model and says whether the service is ready, and if not, why."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str = "cpu",
        reload_interval: float = 2.0,
        policy: ValidationPolicy | None = None,
        pin: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.reload_interval = reload_interval
        self.policy = policy or ValidationPolicy()
        self.pin = pin
        self.current: LoadedModel | None = None
        self.reason = "the model has not been loaded yet"
        # The last refused candidate ({"version", "reason", "message", "at", "measured"}), until a
        # newer model is accepted; shown by /model and /readyz.
        self.candidate: dict | None = None
        # Called with the reason code of every refusal; service.metrics counts them.
        self.rejection_observer: Callable[[str], None] | None = None
        self._failed_signature: tuple | None = None
        self._next_check = 0.0
        # Called with (verdicts, seconds) after every prediction; service.metrics sets it.
        self.observer: Callable[[torch.Tensor, float], None] | None = None
        # Under a threaded server (``flask run``, the test client in threads) only one thread loads;
        # the others keep serving the current model.
        self._reload_lock = threading.Lock()

    # ------------------------------------------------------------------ serving

    def require(self) -> LoadedModel:
        """The verified model to answer with (a newer one if it just landed), or a 503 saying why not."""
        self.maybe_reload()
        current = self.current
        if current is None:
            raise ServiceError(503, "model_not_ready", self.reason)
        return current

    def predict(self, model: LoadedModel, batch: torch.Tensor) -> Verdicts:
        """``model``'s verdicts (probabilities, calibrated confidence, reasons) for ``batch``. ``model`` is the
        one ``require`` gave the request, so a swap in between cannot answer with one model and label the
        answer with another. Under the service's worker, in one forward pass with the other requests that
        reach the model at the same moment (service.batching)."""
        return batching.predict(self.predict_now, model, batch)

    def predict_now(self, model: LoadedModel, batch: torch.Tensor) -> Verdicts:
        """``predict`` as one forward pass of its own, reported to ``observer`` (the metrics) with the
        seconds it took."""
        started = time.perf_counter()
        verdicts = model.predict(batch)
        if self.observer is not None:
            self.observer(verdicts, time.perf_counter() - started)
        return verdicts

    # ------------------------------------------------------------------ loading

    def source_dir(self) -> Path:
        """Where the model to serve is: MODEL_DIR, or with a pin its archived copy when there is one."""
        if self.pin:
            archived = self.model_dir / HISTORY_DIR / self.pin
            if (archived / CARD_FILE).is_file():
                return archived
        return self.model_dir

    def _load_verified(self, source: Path, signature: tuple | None) -> LoadedModel:
        """Load, verify, warm up and validate the model in ``source``: CheckpointError, ProbeError or
        CandidateRejected (carrying the candidate's version) when it must not be served."""
        started = time.perf_counter()
        model, card, judge = load_judged(source, self.device)
        loaded = LoadedModel(
            model=model, card=card, device=self.device, signature=signature, source=str(source), judge=judge
        )
        if self.pin and loaded.version != self.pin:
            raise CheckpointError(
                f"MODEL_VERSION={self.pin} is pinned, but {source} holds version {loaded.version} "
                f"and {self.model_dir / HISTORY_DIR / self.pin} does not exist"
            )
        self._warm_up(loaded)
        try:
            validation = validate_candidate(model, card, self.policy)
        except CandidateRejected as rejection:
            rejection.version = loaded.version
            raise
        return replace(loaded, validation=validation, load_seconds=time.perf_counter() - started)

    def load(self) -> bool:
        """Load, verify, warm up and validate the model; swap it in on success.

        Returns whether a new model is now served. On failure the previous model (if any)
        stays, and ``reason`` says what is wrong when there is nothing to serve.
        """
        source = self.source_dir()
        signature = _files_signature(source)
        try:
            loaded = self._load_verified(source, signature)
        except (CheckpointError, ProbeError) as error:
            self._failed_signature = signature
            if self.current is None:
                self.reason = f"cannot serve the model in {source}: {error}"
            log.warning(
                "model not loaded from %s: %s",
                source,
                error,
                extra={"still_serving": self.current.version if self.current else None},
            )
            return False
        except CandidateRejected as rejection:
            self._failed_signature = signature
            self._refused(rejection, source)
            return False
        self._serve(loaded)
        self.candidate = None
        return True

    def _serve(self, loaded: LoadedModel, fallback: bool = False) -> None:
        previous = self.current
        self.current = loaded
        self.reason = ""
        if not fallback:
            self._failed_signature = None
        log.info(
            "serving model %s version %s on %s",
            loaded.card.get("name"),
            loaded.version,
            self.device,
            extra={
                "model_version": loaded.version,
                "previous_version": previous.version if previous else None,
                "probe": loaded.validation,
                "source": loaded.source,
            },
        )

    def _refused(self, rejection: CandidateRejected, source: Path) -> None:
        """Report a refused candidate; with nothing in memory, fall back to the newest archived model that passes."""
        version = rejection.version
        self.candidate = {
            "version": version,
            "reason": rejection.reason,
            "message": rejection.message,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "measured": rejection.measured,
        }
        if self.rejection_observer is not None:
            self.rejection_observer(rejection.reason)
        if self.current is None and not self.pin:
            self._fall_back()
        still = self.current.version if self.current else None
        log.warning(
            "model candidate %s in %s refused (%s): %s",
            version,
            source,
            rejection.reason,
            rejection.message,
            extra={
                "reason": rejection.reason,
                "candidate_version": version,
                "still_serving": still,
                "measured": rejection.measured,
            },
        )
        if self.current is None:
            self.reason = f"the model {version} in {source} was refused ({rejection.reason}): {rejection.message}"

    def _fall_back(self) -> None:
        for entry in archived_entries(self.model_dir):
            if entry.version == self.candidate["version"]:
                continue
            try:
                loaded = self._load_verified(entry.path, _files_signature(entry.path))
            except (CheckpointError, ProbeError, CandidateRejected):
                continue
            self._serve(loaded, fallback=True)
            return

    @property
    def warning(self) -> str | None:
        """What /readyz says beside "ready" when a newer candidate was refused."""
        candidate, current = self.candidate, self.current
        if candidate is None or current is None:
            return None
        return (
            f"candidate model {candidate['version']} was refused ({candidate['reason']}): {candidate['message']}; "
            f"still serving {current.version}"
        )

    @staticmethod
    def _warm_up(loaded: LoadedModel) -> None:
        """One forward before serving: first-call allocations and kernel selection happen here."""
        probabilities = loaded.predict(torch.zeros((2, *INPUT_SHAPE))).probabilities
        if probabilities.shape != (2, NUM_CLASSES) or not torch.isfinite(probabilities).all():
            raise CheckpointError("the warm-up forward did not produce finite probabilities")

    def maybe_reload(self) -> None:
        """Every reload_interval seconds at most: load the model again if its files changed."""
        if self.reload_interval <= 0 and self.current is not None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        if not self._reload_lock.acquire(blocking=False):
            return
        try:
            self._next_check = now + self.reload_interval
            signature = _files_signature(self.source_dir())
            if signature is None:
                if self.current is None:
                    self.reason = f"no model in {self.model_dir} (expected {CARD_FILE} and {WEIGHTS_FILE})"
                return
            known = self.current.signature if self.current else None
            if signature != known and signature != self._failed_signature:
                self.load()
        finally:
            self._reload_lock.release()

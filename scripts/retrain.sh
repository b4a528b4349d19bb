#!/usr/bin/env bash
# Retrain in the train container, then gate the new model on accuracy. The CI workflow
# (.github/workflows/retrain.yml) runs exactly this; so can anyone with Docker:
#
#   scripts/retrain.sh [TRAINING_ARGS...]          e.g. scripts/retrain.sh --epochs 15 --seed 1
#
# Steps: build the `train` image; run `python -m training TRAINING_ARGS` in it (non-root, read-only root
# filesystem, no capabilities) writing into a fresh OUTPUT_DIR; in the same image, score the new model on
# the probe set with the service's own rule (`fashion-models validate`, writing validation.json); then the
# gate refuses the new model when that validation refused it, or when its test accuracy is more than
# MAX_DROP_POINTS percentage points below the current model's (CURRENT_MODEL). The new model, its card,
# its plots, validation.json and gate.json stay in OUTPUT_DIR either way; promoting an accepted model is
# left to a person: `fashion-models promote OUTPUT_DIR` (validates again, keeps the current one in
# models/history/).
#
# Exit status: 0 accepted; 1 refused by the gate; 2 bad usage, a card or the validation report that cannot
# be read; other non-zero: the build or the training failed.
#
# MIN_PROBE_ACCURACY, MAX_PROBE_DROP and MIN_PROBE_AGREEMENT, when set, reach the validation as they would
# the service.
#
# Environment:
#   OUTPUT_DIR       where the new model goes; must not exist or be empty (default retrain-out/<UTC time>)
#   CURRENT_MODEL    the model to beat (default models)
#   MAX_DROP_POINTS  allowed drop in test accuracy, percentage points (default 0.5)
#   TORCH_INDEX_URL  torch wheel index for the build (default PyTorch's CPU index; empty = pip's default, CUDA)
#   TRAIN_IMAGE      tag of the image to build and run (default fashion-mnist-train:retrain)
#   DOCKER_RUN_ARGS  extra `docker run` arguments, e.g. "--gpus all"
set -euo pipefail
cd "$(dirname "$0")/.."

output_dir=${OUTPUT_DIR:-retrain-out/$(date -u +%Y%m%dT%H%M%SZ)}
current_model=${CURRENT_MODEL:-models}
max_drop=${MAX_DROP_POINTS:-0.5}
image=${TRAIN_IMAGE:-fashion-mnist-train:retrain}
log() { echo "retrain: $*" >&2; }

if [[ -e $output_dir && -n $(ls -A "$output_dir" 2>/dev/null) ]]; then
  log "OUTPUT_DIR $output_dir is not empty: retraining writes into a fresh folder"
  exit 2
fi
mkdir -p "$output_dir"
output_dir=$(cd "$output_dir" && pwd)

log "building the train image $image"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# TORCH_INDEX_URL is passed only when set (empty included): unset keeps the Dockerfile's default.
docker build --target train ${TORCH_INDEX_URL+"--build-arg=TORCH_INDEX_URL=$TORCH_INDEX_URL"} \
  --build-arg "REVISION=$revision" -t "$image" .

# The container never runs as root. Run it as the caller so the files are the caller's; a root caller
# hands the folder to the image's own user (uid 10001) instead.
if [[ $(id -u) -eq 0 ]]; then
  chown 10001:10001 "$output_dir"
  user=10001:10001
else
  user="$(id -u):$(id -g)"
fi

log "training: python -m training $* -> $output_dir"
# shellcheck disable=SC2086  # DOCKER_RUN_ARGS is a list of words on purpose
docker run --rm --user "$user" --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  ${DOCKER_RUN_ARGS:-} -v "$output_dir:/app/models" "$image" "$@"

log "validating the new model on the probe set: fashion-models validate"
# Exit status 1 (refused) is the gate's to report, from validation.json; anything else stops here.
validation=0
# shellcheck disable=SC2086
docker run --rm --user "$user" --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  ${DOCKER_RUN_ARGS:-} -v "$output_dir:/app/models" \
  -e MIN_PROBE_ACCURACY -e MAX_PROBE_DROP -e MIN_PROBE_AGREEMENT \
  --entrypoint python "$image" -m fashion.models_cli validate /app/models --report /app/models/validation.json \
  || validation=$?
if [[ $validation -ne 0 && $validation -ne 1 ]]; then
  log "the validation could not run (exit status $validation)"
  exit "$validation"
fi

# The gate is standard library Python, so it needs only python3 on the host, not the project's venv.
status=0
python3 scripts/accuracy_gate.py "$current_model" "$output_dir" --max-drop-points "$max_drop" \
  --probe-report "$output_dir/validation.json" --report "$output_dir/gate.json" || status=$?
log "artifacts in $output_dir:"; ls -l "$output_dir" >&2
exit "$status"

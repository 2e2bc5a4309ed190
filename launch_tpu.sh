#!/usr/bin/env bash
# Trains cfm-jax on a Cloud TPU VM pod slice: every host of the slice runs the same train.py.
#
# Steps: plan the config for the slice (compile-only, on this machine: does it fit the chips'
# HBM? refuse if not, unless --skip-plan), create the pod (or a queued resource) unless it exists, pack the files tracked by git
# and copy them to every worker, install requirements.txt plus jax[tpu] of the pinned jax
# version in a venv on every worker, start train.py in the background on all workers, and
# follow worker 0's log. `--dry-run` prints the commands instead of running them.
# Every command goes through `run`, which either prints or executes it.
set -euo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly PROG ROOT

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --bucket BUCKET [options] [-- TRAIN_ARGS...]
       $PROG --name NAME --zone ZONE --delete [--queued]

First compiles the config for the slice's topology on this machine (python -m cfm_jax.plan,
compile-only, needs libtpu: pip install -r requirements-test.txt) and refuses to go on when it
does not fit the chips' memory, printing the plan's recommendation (--skip-plan overrides this).
Then creates (or reuses) the TPU VM pod slice NAME, copies the files tracked by git to all its
workers, installs the requirements (and jax[tpu] at the jax version pinned in
requirements.txt) and starts train.py on every worker with the same arguments. Arguments
after '--' go to train.py verbatim. Each worker logs to REMOTE_DIR/train.log; the script
then follows worker 0's log (Ctrl-C stops following, not training).

Options:
  --name NAME              TPU VM name (required; lowercase letters, digits, hyphens)
  --zone ZONE              zone, e.g. us-central2-b (required)
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE  slice type (default: v4-32; e.g. v5litepod-64)
  --runtime-version VER    TPU VM image (default: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite)
  --bucket BUCKET          the run writes to --workdir gs://BUCKET/RUN_NAME (required unless
                           train.py's --workdir is given after '--'); BUCKET may hold a path
  --run-name RUN_NAME      default: the config file's name without .py
  --config FILE            train.py config (default: configs/flow400_64-128/unet_base_psu.py)
  --queued                 request the slice as a queued resource NAME-qr and wait until it
                           is ACTIVE (with --delete: delete the queued resource and its node)
  --spot                   Spot VMs (preemptible; re-launch with the same --run-name resumes)
  --python PYTHON          interpreter for the venv on the workers (default: python3.11,
                           installed with apt if missing; the pinned packages need >= 3.11)
  --remote-dir DIR         code, venv and train.log on the workers (default: ~/cfm-jax)
  --no-follow              start training and return instead of following worker 0's log
  --skip-plan              do not compile the config for the slice first (python -m cfm_jax.plan)
  --plan-search N          layout search of the plan: at most N more compiles (default: 2)
  --delete                 delete the pod (or, with --queued, the queued resource) and exit
  --dry-run                print the commands (lines '+ ...', comments '# ...'), run nothing
  -h, --help               this text

Examples:
  $PROG --name cfm-v4 --zone us-central2-b --bucket my-bucket/cfm -- \\
      --config.first_stage.path=/path/on/every/host --config.data.path=/path/on/every/host
  $PROG --name cfm-v5e --zone us-west4-a --accelerator-type v5litepod-64 \\
      --runtime-version v2-alpha-tpuv5-lite --queued --spot --bucket my-bucket --dry-run
  $PROG --name cfm-v4 --zone us-central2-b --delete
EOF
}

die_usage() { printf '%s: error: %s (see --help)\n' "$PROG" "$1" >&2; exit 2; }
die() { printf '%s: error: %s\n' "$PROG" "$1" >&2; exit 1; }

# ---------------------------------------------------------------------------- command line
NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="v4-32" RUNTIME_VERSION="tpu-ubuntu2204-base"
BUCKET="" RUN_NAME="" CONFIG="configs/flow400_64-128/unet_base_psu.py" PYTHON="python3.11"
# shellcheck disable=SC2088  # the tilde is meant for the workers' shell, which expands it
REMOTE_DIR="~/cfm-jax"
QUEUED=0 SPOT=0 FOLLOW=1 DELETE=0 DRY_RUN=0 SKIP_PLAN=0 PLAN_SEARCH=2
TRAIN_ARGS=()

set_option() {  # set_option FLAG VALUE
  [[ -n $2 ]] || die_usage "$1 needs a value"
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --bucket) BUCKET=$2 ;;
    --run-name) RUN_NAME=$2 ;;
    --config) CONFIG=$2 ;;
    --python) PYTHON=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --plan-search)
      [[ $2 =~ ^[0-9]+$ ]] || die_usage "--plan-search needs a number, got '$2'"
      PLAN_SEARCH=$2 ;;
  esac
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --no-follow) FOLLOW=0 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-plan) SKIP_PLAN=1 ;;
    --name | --zone | --project | --accelerator-type | --runtime-version | --bucket | --run-name | \
      --config | --python | --remote-dir | --plan-search)
      # a following flag is a forgotten value, not a value
      if (($# < 2)) || [[ $2 == -* ]]; then die_usage "$1 needs a value"; fi
      set_option "$1" "$2"
      shift ;;
    --name=* | --zone=* | --project=* | --accelerator-type=* | --runtime-version=* | --bucket=* | \
      --run-name=* | --config=* | --python=* | --remote-dir=* | --plan-search=*)
      set_option "${1%%=*}" "${1#*=}" ;;
    *) die_usage "unknown argument '$1'; train.py's arguments go after '--'" ;;
  esac
  shift
done

[[ -n $NAME ]] || die_usage "--name is required"
[[ -n $ZONE ]] || die_usage "--zone is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die_usage "--name '$NAME' is not a valid TPU name (lowercase letters, digits and hyphens, starting with a letter)"
QR_NAME="$NAME-qr"
QUEUED_FLAG=""
if ((QUEUED)); then QUEUED_FLAG=" --queued"; fi

# train.py arguments the user gave after '--' take precedence over ours
user_gave() {  # user_gave FLAG: is --FLAG or --FLAG=... among TRAIN_ARGS?
  local arg
  for arg in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
    [[ $arg == "$1" || $arg == "$1="* ]] && return 0
  done
  return 1
}

if ((DELETE)); then
  ((${#TRAIN_ARGS[@]} == 0)) || die_usage "--delete takes no train.py arguments"
else
  if ! user_gave --workdir; then
    [[ -n $BUCKET ]] || die_usage "--bucket is required (or pass train.py's --workdir after '--')"
    BUCKET=${BUCKET#gs://}
    BUCKET=${BUCKET%/}
    if [[ -z $RUN_NAME ]]; then
      RUN_NAME=${CONFIG##*/}
      RUN_NAME=${RUN_NAME%%:*}
      RUN_NAME=${RUN_NAME%.py}
    fi
    WORKDIR="gs://$BUCKET/$RUN_NAME"
  fi
  if ! user_gave --config && [[ ! -f $ROOT/${CONFIG%%:*} ]]; then
    die_usage "--config '$CONFIG' is not a file of this repository"
  fi
  # the TPU build of exactly the jax version that requirements.txt pins
  JAX_VERSION=$(sed -n 's/^jax==\([^[:space:]#;]*\).*/\1/p' "$ROOT/requirements.txt")
  [[ -n $JAX_VERSION ]] || die "requirements.txt pins no 'jax==VERSION'"
fi

# ---------------------------------------------------------------------------- helpers
quote() {  # quote ARG: ARG as a shell word, unquoted when that is safe
  local safe='^[A-Za-z0-9_@%+=:,./-]+$' sq="'\\''"
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/$sq}"
  fi
}

note() {  # a comment line in a dry run, a message on stderr otherwise
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf '%s: %s\n' "$PROG" "$*" >&2
  fi
}

shown() {  # shown CMD...: the line '+ CMD' with every argument quoted
  local line="+" arg
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  printf '%s\n' "$line"
}

run() {  # run CMD...: print it (dry run), or echo it to stderr and execute it
  if ((DRY_RUN)); then
    shown "$@"
  else
    shown "$@" >&2
    "$@"
  fi
}

GCLOUD_TAIL=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_TAIL+=("--project=$PROJECT")

gcloud_tpu() {  # gcloud_tpu GROUP VERB ARGS...: a `gcloud compute tpus` command in ZONE/PROJECT
  run gcloud compute tpus "$@" "${GCLOUD_TAIL[@]}"
}

query() {  # query GROUP VERB ARGS...: a read-only gcloud command, its errors hidden (never in a dry run)
  shown gcloud compute tpus "$@" "${GCLOUD_TAIL[@]}" >&2
  gcloud compute tpus "$@" "${GCLOUD_TAIL[@]}" 2>/dev/null
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND: run a shell command over ssh
  gcloud_tpu tpu-vm ssh "$NAME" "--worker=$1" --command "$2"
}

# shellcheck disable=SC2088  # the leading ~/ is left unquoted on purpose: the workers expand it
remote_path() {  # remote_path PATH: PATH quoted for the workers' shell, a leading ~/ kept
  case $1 in
    "~") printf '~' ;;
    "~/"*) printf '~/%s' "$(printf '%q' "${1#\~/}")" ;;
    *) printf '%q' "$1" ;;
  esac
}

# ---------------------------------------------------------------------------- --delete
if ((DELETE)); then
  if ((QUEUED)); then
    gcloud_tpu queued-resources delete "$QR_NAME" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$NAME" --quiet
  fi
  exit 0
fi

if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud not found on PATH (install the Google Cloud CLI)"
  git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git checkout"
fi

# ---------------------------------------------------------------------------- 0. the plan
plan_args() {  # the plan's command line: our config (or the user's), their --config.* overrides
  local args=(-m cfm_jax.plan --topology "$ACCELERATOR_TYPE" --search "$PLAN_SEARCH") i=0 arg
  user_gave --config || args+=(--config "$CONFIG")
  while ((i < ${#TRAIN_ARGS[@]})); do
    arg=${TRAIN_ARGS[i]}
    case $arg in
      --config=* | --config.*=*) args+=("$arg") ;;
      --config | --config.*) args+=("$arg" "${TRAIN_ARGS[i + 1]-}"); i=$((i + 1)) ;;
    esac
    i=$((i + 1))
  done
  printf '%s\0' "${args[@]}"
}

check_plan() {
  local plan_py=${CFM_PLAN_PYTHON:-}
  if [[ -z $plan_py ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then plan_py=$ROOT/.venv/bin/python; else plan_py=python3; fi
  fi
  local args=()
  while IFS= read -r -d '' arg; do args+=("$arg"); done < <(plan_args)
  if ((DRY_RUN)); then
    (cd "$ROOT" && run "$plan_py" "${args[@]}")
    return
  fi
  note "compiling the config for $ACCELERATOR_TYPE before creating anything (--skip-plan skips this)"
  local rc=0
  (cd "$ROOT" && run "$plan_py" "${args[@]}") || rc=$?
  case $rc in
    0) note "the plan fits $ACCELERATOR_TYPE" ;;
    3) die "the config does not fit $ACCELERATOR_TYPE (plan above; its recommended overrides go after '--'); nothing was created. --skip-plan launches anyway" ;;
    *) die "the plan could not run (exit $rc; see above: libtpu missing? pip install -r requirements-test.txt); nothing was created. --skip-plan launches without it" ;;
  esac
}

((SKIP_PLAN)) || check_plan

# ---------------------------------------------------------------------------- 1. the pod
wait_until_active() {  # polls the queued resource until its nodes are provisioned
  local state poll=${CFM_TPU_POLL_SECONDS:-60}
  if ((DRY_RUN)); then
    gcloud_tpu queued-resources describe "$QR_NAME" "--format=value(state.state)"
    note "(repeated every ${poll} s until the state is ACTIVE)"
    return
  fi
  while :; do
    state=$(query queued-resources describe "$QR_NAME" "--format=value(state.state)") ||
      die "cannot describe queued resource $QR_NAME"
    case $state in
      ACTIVE) note "queued resource $QR_NAME is ACTIVE"; return ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $QR_NAME is $state; delete it with --delete --queued and try again" ;;
    esac
    note "queued resource $QR_NAME is ${state:-not yet visible}; checking again in ${poll} s"
    sleep "$poll"
  done
}

ensure_pod() {
  local state
  if ((DRY_RUN)); then
    note "dry run: not checking whether TPU $NAME exists; assuming it does not"
  elif state=$(query tpu-vm describe "$NAME" "--format=value(state)"); then
    case $state in
      PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING)
        die "TPU $NAME exists but is $state; delete it with --delete$QUEUED_FLAG and launch again" ;;
    esac
    note "reusing TPU $NAME (state ${state:-unknown})"
    return
  fi
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((QUEUED)); then
    if ((!DRY_RUN)) && query queued-resources describe "$QR_NAME" >/dev/null; then
      note "queued resource $QR_NAME exists already; waiting for it"
    else
      gcloud_tpu queued-resources create "$QR_NAME" "--node-id=$NAME" \
        "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
    fi
    wait_until_active
  else
    gcloud_tpu tpu-vm create "$NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--version=$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  fi
}

ensure_pod

# ---------------------------------------------------------------------------- 2. the code
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cfm-jax-launch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TARBALL="$WORK/cfm-jax-code.tar.gz"
UPLOAD=cfm-jax-code.tar.gz  # in the workers' home directory, removed once unpacked
RDIR=$(remote_path "$REMOTE_DIR")

pack_code() {  # the files tracked by git, as they are in the work tree, into TARBALL
  local file
  git -C "$ROOT" ls-files -z | while IFS= read -r -d '' file; do
    # a tracked file deleted in the work tree is not shipped
    if [[ -e $ROOT/$file || -L $ROOT/$file ]]; then printf '%s\0' "$file"; fi
  done >"$WORK/files"
  tar -czf "$TARBALL" -C "$ROOT" --null -T "$WORK/files"
}

if ((DRY_RUN)); then
  note "pack the files tracked by git (git ls-files) into $TARBALL"
else
  pack_code
  note "packed $(tr -cd '\0' <"$WORK/files" | wc -c | tr -d ' ') files tracked by git"
fi
gcloud_tpu tpu-vm scp "$TARBALL" "$NAME:$UPLOAD" --worker=all
on_workers all "mkdir -p $RDIR && tar -xzf ~/$UPLOAD -C $RDIR && rm -f ~/$UPLOAD"

# ---------------------------------------------------------------------------- 3. requirements
PY=$(printf '%q' "$PYTHON")
install="cd $RDIR"
# Ubuntu 22.04 images have Python 3.10; the pinned numpy/scipy/jax need >= 3.11
install+=" && { command -v $PY >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $PY $PY-venv; }; }"
install+=" && $PY -m venv .venv && .venv/bin/pip install -q --upgrade pip"
install+=" && .venv/bin/pip install -q -r requirements.txt -r requirements-tpu.txt $(printf '%q' "jax[tpu]==$JAX_VERSION")"
install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
on_workers all "$install"

# ---------------------------------------------------------------------------- 4. training
train=(train.py)
user_gave --config || train+=(--config "$CONFIG")
user_gave --workdir || train+=(--workdir "$WORKDIR")
# Every TPU VM host joins jax.distributed (JAX finds the slice's peers from the VM metadata; one
# host joins as process 0 of 1). Environment variables alone do not reveal a TPU slice.
user_gave --distributed || train+=(--distributed=on)
train+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
train_q=$(printf ' %q' "${train[@]}")
# One process per host; jax.distributed finds its peers from the TPU VM metadata. The pid file
# keeps a second launch from starting while the first still holds the TPU.
start="cd $RDIR || exit 1"
start+="; if [ -f train.pid ] && kill -0 \"\$(cat train.pid)\" 2>/dev/null; then"
start+=" echo \"train.py is still running on \$(hostname) (pid \$(cat train.pid)); kill it first\" >&2; exit 1; fi"
start+="; nohup env PYTHONUNBUFFERED=1 .venv/bin/python$train_q > train.log 2>&1 < /dev/null &"
start+=" echo \$! > train.pid; echo \"train.py started on \$(hostname), pid \$!\""
on_workers all "$start"

# ---------------------------------------------------------------------------- 5. the log
follow="tail -n 100 -F $RDIR/train.log"
if ((FOLLOW)); then
  note "following worker 0's log; Ctrl-C stops following, training goes on"
  on_workers 0 "$follow"
else
  note "training started; follow it with: gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=0 --command='$follow'"
  note "delete the pod when done with: $PROG --name $NAME --zone $ZONE --delete$QUEUED_FLAG"
fi

#!/usr/bin/env bash
# Accelerator numbers of the paper configuration on one NVIDIA GPU (written for an H200):
# picks a Python with a GPU jax, sets the XLA flags, runs bench/bench_accelerator.py within
# a time budget, and leaves its JSON lines and log in $OUT when that is set.
#
#   bash bench/run_h200.sh                        # JSON lines on stdout
#   PROFILE=1 bash bench/run_h200.sh              # plus a jax.profiler trace of 3 train steps
#                                                 # (runs/profile; $OUT/profile.tar.gz)
#   bash bench/run_h200.sh --noupsample           # arguments go to bench_accelerator.py
#
# On this workplace's device machine (no network; its python3 holds jax with CUDA, flax,
# optax, diffrax, orbax, but not ml_collections and dm-pix) carry the two missing wheels,
# downloaded once on a machine with network:
#   python3 -m pip download --no-deps -d .whl ml_collections==1.1.0 dm-pix==0.4.5
#   device run: command "bash bench/run_h200.sh", carry [".whl"], timeout_s 600
#
# Python, in this order: $PYTHON; .venv/bin/python if its jax sees a GPU; python3 if its jax
# sees a GPU; else a new .venv from requirements.txt plus jax[cuda12] at the pinned version
# (needs PyPI). Missing project packages come from .whl/*.whl (offline), else from PyPI.
#
# Time: TOTAL_BUDGET_S (default 540 s) for everything; the script gets what the set-up leaves,
# at most 480 s, and is killed 45 s after its own budget if a compile overruns it. Its rows are
# flushed as they are measured, so a cut-short run still leaves them.
#
# XLA / JAX settings (override by exporting them first):
# * XLA_FLAGS += --xla_gpu_enable_latency_hiding_scheduler=true: NVIDIA's JAX containers set
#   it; on one GPU it has no collectives to overlap and only reorders independent kernels, so
#   it keeps the numbers comparable with multi-GPU runs. The flags are tried on a tiny program
#   first and dropped (reported) if this jaxlib does not know them.
# * Autotuning stays at XLA's default level (4: cuDNN/cuBLAS/Triton candidates timed, results
#   checked); lower levels compile faster and run slower.
# * XLA_PYTHON_CLIENT_MEM_FRACTION stays at JAX's default 0.75: the allocator's limit is then
#   about XLA's own rematerialisation limit (80% x 95% of the device memory, minus a program's
#   inputs and outputs), so a batch that passes the script's memory check is also not
#   rematerialised by XLA behind its back (extra FLOPs the MFU would not count).
# * JAX_COMPILATION_CACHE_DIR=runs/xla_cache: a second run on the same machine loads the
#   compiled programs (its compile_s are then load times).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
total=${TOTAL_BUDGET_S:-540}
out=${OUT:-}
log() { echo "[run_h200 +$((SECONDS - start))s] $*" >&2; }

gpu_jax() {  # does this Python import jax with a GPU backend?
  "$1" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >/dev/null 2>&1
}

py=${PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x .venv/bin/python ]] && gpu_jax .venv/bin/python; then
    py=.venv/bin/python
  elif command -v python3 >/dev/null && gpu_jax python3; then
    py=$(command -v python3)
  else
    jax_version=$(sed -n 's/^jax==//p' requirements.txt)
    log "no GPU jax found: creating .venv with requirements.txt and jax[cuda12]==$jax_version (needs PyPI)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet -r requirements.txt "jax[cuda12]==$jax_version"
    py=.venv/bin/python
  fi
fi
log "python: $py"

# Project packages this Python lacks (the device image has no ml_collections and dm-pix).
missing=$("$py" - <<'EOF'
import importlib.util
mods = {"ml_collections": "ml_collections", "dm_pix": "dm-pix", "flax": "flax", "optax": "optax",
        "diffrax": "diffrax", "orbax.checkpoint": "orbax-checkpoint", "etils": "etils", "absl": "absl-py"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m.split(".")[0]) is None))
EOF
)
if [[ -n $missing ]]; then
  site=/tmp/cfm_site
  mkdir -p "$site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing $missing from .whl/ into $site"
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  else
    pins=()
    for p in $missing; do
      pins+=("$(grep -i -E "^${p//-/[-_]}==" requirements.txt || echo "$p")")
    done
    log "installing ${pins[*]} from PyPI into $site (no .whl/ folder)"
    "$py" -m pip install --quiet --retries 0 --timeout 20 --target "$site" "${pins[@]}" || {
      log "cannot install ${pins[*]}: no network? Download the wheels where pip works, carry .whl:"
      log "  python3 -m pip download --no-deps -d .whl ${pins[*]}"
      exit 3
    }
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

flags="--xla_gpu_enable_latency_hiding_scheduler=true"
probe='import jax; jax.numpy.zeros(8).block_until_ready(); print("[run_h200] jax", jax.__version__, jax.devices())'
if XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flags" "$py" -c "$probe" >&2; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flags"
else
  log "this jaxlib rejects $flags (or jax failed): trying without them"
  "$py" -c "$probe" >&2
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-runs/xla_cache}
export PYTHONUNBUFFERED=1

budget=$((total - (SECONDS - start) - 30))
if ((budget > 480)); then
  budget=480
fi
if ((budget < 120)); then
  log "only ${budget}s left for the benchmark after the set-up; raise TOTAL_BUDGET_S"
  exit 4
fi
args=(--budget_s "$budget")
if [[ -n $out ]]; then
  mkdir -p "$out"
  args+=(--out_jsonl "$out/bench_accelerator.jsonl")
fi
if [[ -n ${PROFILE:-} ]]; then
  rm -rf runs/profile
  args+=(--profile_dir runs/profile)
fi
log "bench_accelerator.py budget ${budget}s ${args[*]} $*"
status=0
if [[ -n $out ]]; then
  # stderr (XLA's warnings, e.g. rematerialisation messages) is kept whole in the log
  timeout --kill-after=15 $((budget + 45)) "$py" bench/bench_accelerator.py "${args[@]}" "$@" \
    2> >(tee "$out/bench_accelerator.log" >&2) || status=$?
else
  timeout --kill-after=15 $((budget + 45)) "$py" bench/bench_accelerator.py "${args[@]}" "$@" || status=$?
fi
if [[ -n ${PROFILE:-} && -n $out && -d runs/profile ]]; then
  # the trace lies 4 folders down (plugins/profile/<run>/); $OUT returns files at most 2 down
  tar czf "$out/profile.tar.gz" -C runs profile && log "trace: $out/profile.tar.gz"
fi
log "done (exit $status)"
exit "$status"

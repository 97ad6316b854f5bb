#!/usr/bin/env bash
# The NCEP/NCAR daily sea-level pressure skill recipe, end to end (docs/skill.md):
#   data inspect -> statistics on the training years -> the anchor's fit -> train.py -> forecasts for every
#   day of 2008 and of the scored years (leads 1-10 days) -> the blend with the baselines and the field-wide
#   linear forecast, fitted on the 2008 forecasts -> weathermixer.evaluate against persistence, climatology
#   and the per-pixel linear regression fitted on the training years only -> OUT/report/metrics.csv
#
#   bash benchmarks/skill_ncep_slp.sh OUT [--validation] [--job FILE] [--seeds N] [--jobs N] [--steps N] [--days N]
#       [--reuse] [--blend field|baselines] [--shrink LIST]
# Train 2001-2007, validation 2008, test 2009-2010. Without --validation the test years are scored;
# --validation scores 2008 (every choice of the recipe is made there; the blend weights are then fitted
# and scored on the same year, so its 2008 rows are in-sample for those 2 or 3 numbers per lead). --seeds N
# (default 5) trains N seeds and scores the mean of their forecasts; --jobs N (default: the cores this process
# may use) trains up to N seeds at once, one thread each. --steps and --days shrink the run
# (CI: a few steps, a few days). --reuse keeps the seeds already trained in OUT (the same job; training
# never sees the scored years, so a --validation run's models can then score the test years).
# OUT/report_raw holds the scores before the blend. --blend field (default): the blend of the forecast with the
# climatology, the per-pixel regression and the field-wide linear forecast (weathermixer.evaluation.damping
# fit --field-linear); --blend baselines: without the field-wide forecast. --shrink LIST (e.g. 0,0.1,1,inf): the blend
# weights shrunk towards the per-pixel regression, one ridge per lead chosen by 2-fold cross-validation over
# alternate months of 2008 (damping fit --shrink).
# Data: NCEP/NCAR Reanalysis 1 (Kalnay et al. 1996), provided by NOAA PSL, Boulder, Colorado, USA;
# see ../shared/data/real/ATTRIBUTION.md.
set -euo pipefail

usage() { sed -n 8,9p "$0" | sed 's/^#   //' >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
JOB=deepspeed_configs/ncep_slp_daily_cpu.json
SPLIT=test SEEDS=5 JOBS=$(nproc) STEPS= DAYS= REUSE= BLEND=field SHRINK=
while [ $# -gt 0 ]; do
  case $1 in
    --validation) SPLIT=val ;;
    --job) JOB=$2; shift ;;
    --seeds) SEEDS=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --days) DAYS=$2; shift ;;
    --reuse) REUSE=1 ;;
    --blend) BLEND=$2; shift ;;
    --shrink) SHRINK=$2; shift ;;
    *) echo "skill_ncep_slp.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "skill_ncep_slp.sh: --jobs $JOBS: give a whole number >= 1" >&2; usage; }
case $BLEND in
  field) BLEND_ARGS=(--field-linear) ;;
  baselines) BLEND_ARGS=() ;;
  *) echo "skill_ncep_slp.sh: --blend $BLEND: choose field or baselines" >&2; usage ;;
esac
[ -n "$SHRINK" ] && BLEND_ARGS+=(--shrink "$SHRINK")
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
job_key() {  # SECTION KEY DEFAULT -> weathermixer.SECTION.KEY of the job file
  $PY -c "import json, sys; job = json.load(open(sys.argv[1]))['weathermixer']
print(job[sys.argv[2]].get(sys.argv[3], sys.argv[4]))" "$JOB" "$1" "$2" "$3"
}
TRUTH=$(job_key data path "")
SKIP=$(job_key model pixel_skip 0)
TRAIN_START=2001-01-01 TRAIN_END=2007-12-31
VAL_FIRST=2008-01-01 VAL_LAST=2008-12-21
if [ "$SPLIT" = val ]; then FIRST=$VAL_FIRST LAST=$VAL_LAST; else FIRST=2009-01-01 LAST=2010-12-21; fi
last_of() {  # FIRST DAYS -> the DAYS-th day from FIRST
  $PY -c "import pandas as pd, sys; t = pd.Timestamp(sys.argv[1]) + pd.Timedelta(days=int(sys.argv[2]) - 1)
print(t.date())" "$1" "$2"
}
if [ -n "$DAYS" ]; then LAST=$(last_of $FIRST "$DAYS"); VAL_LAST=$(last_of $VAL_FIRST "$DAYS"); fi
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[skill_ncep_slp $(( $(date +%s) - start )) s] $*"; }

log "inspect $TRUTH"
$PY -m weathermixer.data inspect --config "$JOB" > "$OUT/inspect.json"
log "statistics over the training years $TRAIN_START .. $TRAIN_END"
$PY -m weathermixer.data stats --config "$JOB" --start $TRAIN_START --end $TRAIN_END --out "$OUT/stats.json" \
    > "$OUT/stats.log"
SETS=(--set "data.stats=$OUT/stats.json")
if [ "$SKIP" -gt 0 ]; then
  log "anchor fit on the training years, $SKIP lead(s), ridge chosen on validation 2008"
  $PY -m weathermixer.model.skip_fit --config "$JOB" "${SETS[@]}" --leads "$SKIP" \
      --ridge 1e-6,1e-3,1e-2,1e-1,1 --out "$OUT/skip_fit.npz" > "$OUT/skip_fit.log"
  SETS+=(--set "model.pixel_skip_init=$OUT/skip_fit.npz")
fi
[ -n "$STEPS" ] && SETS+=(--set "train.steps=$STEPS" --set "train.warmup=0" --set "validation.every=0")
forecast() {  # RUN FIRST LAST OUT
  $PY -m weathermixer.forecast --checkpoint "$1/checkpoints" --init-times $2 $3 --init-every 24 --lead-hours 240 \
      --batch 64 --out "$4" --overwrite --quiet > "$1.forecast.log" 2>&1 || { tail -30 "$1.forecast.log" >&2; exit 1; }
}
train_seed() {  # S RUN: train seed S into RUN (in the background: up to JOBS at once); RUN.failed if it fails
  local t0
  t0=$(date +%s)
  $PY train.py --deepspeed_config "$JOB" --output-dir "$2" "${SETS[@]}" --set "model.seed=$1" \
      --set "train.seed=$1" > "$2.train.log" 2>&1 || {
    echo "seed $1 failed ($2.train.log):" >&2; tail -30 "$2.train.log" >&2; touch "$2.failed"; exit 1; }
  echo $(( $(date +%s) - t0 )) > "$2.train_seconds"
  grep -m1 "parameters" "$2.train.log" | sed 's/.*model \([0-9,]*\) parameters.*/\1/' > "$2.parameters"
}
TRAINING=()
reap() {  # wait until a seed ends; one that failed stops the others and the script
  local alive=() p f kids
  wait -n || true
  for p in "${TRAINING[@]}"; do if kill -0 "$p" 2>/dev/null; then alive+=("$p"); fi; done
  TRAINING=(${alive[@]+"${alive[@]}"})
  for f in "$OUT"/seed*.failed; do
    [ -e "$f" ] || continue
    [ ${#TRAINING[@]} -eq 0 ] || echo "skill_ncep_slp.sh: stopping the seeds still training" >&2
    for p in ${TRAINING[@]+"${TRAINING[@]}"}; do  # the seed's shell first (no message of its own), then train.py
      kids=$(pgrep -P "$p" || true); kill "$p" || true; [ -z "$kids" ] || kill $kids || true
    done 2>/dev/null
    exit 1
  done
}
rm -f "$OUT"/seed*.failed
for ((s = 0; s < SEEDS; s++)); do
  RUN="$OUT/seed$s"
  if [ -n "$REUSE" ] && [ -s "$RUN.train_seconds" ] && [ -e "$RUN/checkpoints/latest" ]; then
    log "reuse the trained seed $s in $RUN"
  else
    log "train seed $s -> $RUN"
    train_seed $s "$RUN" &
    TRAINING+=($!)
    while [ ${#TRAINING[@]} -ge "$JOBS" ]; do reap; done
  fi
done
while [ ${#TRAINING[@]} -gt 0 ]; do reap; done
MEMBERS=() VAL_MEMBERS=()
for ((s = 0; s < SEEDS; s++)); do
  RUN="$OUT/seed$s"
  log "forecast seed $s: inits $VAL_FIRST .. $VAL_LAST (blend weights) and $FIRST .. $LAST, leads 1-10 days"
  forecast "$RUN" $VAL_FIRST $VAL_LAST "$RUN/forecast_val.zarr"
  VAL_MEMBERS+=("$RUN/forecast_val.zarr")
  if [ "$SPLIT" = test ]; then forecast "$RUN" $FIRST $LAST "$RUN/forecast.zarr"; MEMBERS+=("$RUN/forecast.zarr"); fi
done
VAL_FC=${VAL_MEMBERS[0]}
if [ "$SEEDS" -gt 1 ]; then
  VAL_FC="$OUT/forecast_val_mean.zarr"
  $PY -m weathermixer.inference.ensemble --members "${VAL_MEMBERS[@]}" --out "$VAL_FC" > /dev/null
fi
if [ "$SPLIT" = test ]; then
  FC=${MEMBERS[0]}
  if [ "$SEEDS" -gt 1 ]; then
    FC="$OUT/forecast_mean.zarr"
    $PY -m weathermixer.inference.ensemble --members "${MEMBERS[@]}" --out "$FC" > /dev/null
  fi
else
  FC=$VAL_FC
fi
EVAL=(--truth "$TRUTH" --clim-start $TRAIN_START --clim-end $TRAIN_END --leads 24,48,72,120,240 --quiet)
log "blend ($BLEND): weights fitted on the 2008 forecasts $VAL_FC"
$PY -m weathermixer.evaluation.damping fit --forecast "$VAL_FC" --truth "$TRUTH" --clim-start $TRAIN_START \
    --clim-end $TRAIN_END --out "$OUT/damping.json" "${BLEND_ARGS[@]}"
$PY -m weathermixer.evaluation.damping apply --forecast "$FC" --truth "$TRUTH" --damping "$OUT/damping.json" \
    --out "$OUT/forecast_blend.zarr" > /dev/null
$PY -m weathermixer.evaluate --forecast "$FC" --out "$OUT/report_raw" "${EVAL[@]}" --no-plots > "$OUT/report_raw.log"
FC="$OUT/forecast_blend.zarr"
log "evaluate $FC ($SPLIT) against persistence, climatology and the linear regression on $TRAIN_START .. $TRAIN_END"
$PY -m weathermixer.evaluate --forecast "$FC" --out "$OUT/report" "${EVAL[@]}"
log "done: $OUT/report/metrics.csv"

#!/usr/bin/env bash
# The main job: synthetic data (unless --data), then every stage in order; a re-run resumes.
#   bash run_all.sh [--data DIR] [--run DIR] [--profile quick|default|hard|full] [--config FILE] [key=value ...]
# --config and key=value settings go to every stage and are recorded in RUN/config.yaml.
set -euo pipefail
cd "$(dirname "$0")"

DATA="" RUN="" PROFILE="default"
SETTINGS=()  # --config FILE and key=value overrides, handed to every stage
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA="$2"; shift 2 ;;
        --run) RUN="$2"; shift 2 ;;
        --profile) PROFILE="$2"; shift 2 ;;
        --config) [ -f "$2" ] || { echo "run_all.sh: --config $2: no such file" >&2; exit 2; }
                  SETTINGS+=(--config "$2"); shift 2 ;;
        *=*) SETTINGS+=("$1"); shift ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
RUN="${RUN:-runs/$PROFILE}"

source tools/ensure_venv.sh
export PYTHONUNBUFFERED=1
# torch uses every core; on a machine shared with other jobs run with OMP_NUM_THREADS=1:
# spinning OpenMP threads competing for 2 busy cores slowed training 10-25x (docs/training.md).

if [ -z "$DATA" ]; then  # the synthetic benchmark's size per profile
    case "$PROFILE" in
        quick) SYNTH=(--n-train 24 --n-test 8 --size 128) ;;
        default) SYNTH=(--n-train 400 --n-test 300 --size 256) ;;  # 300 test fields: rare classes get 2-3 each
        hard) SYNTH=(--n-train 400 --n-test 300 --size 256 --difficulty hard) ;;  # docs/synth.md: the hard benchmark
        full) SYNTH=(--n-train 2000 --n-test 400 --size 512) ;;
        *) echo "run_all.sh: unknown profile $PROFILE (quick, default, hard, full)" >&2; exit 2 ;;
    esac
    DATA="data/synth-$PROFILE"
    "$PY" -m hpa.synth "$DATA" "${SYNTH[@]}" --seed 0 --workers 2
fi

# the train split is segmented first: stage 01 sizes its field cache from these cells (image_model.cell_px)
"$PY" stages/03_segment.py --data "$DATA" --run "$RUN" --profile "$PROFILE" --split train "${SETTINGS[@]}"
"$PY" stages/01_train_image.py --data "$DATA" --run "$RUN" --profile "$PROFILE" "${SETTINGS[@]}"
"$PY" stages/03_segment.py --run "$RUN" --split test "${SETTINGS[@]}"
"$PY" stages/02_cam.py --run "$RUN" --split train "${SETTINGS[@]}"
"$PY" stages/02_cam.py --run "$RUN" --split test "${SETTINGS[@]}"
"$PY" stages/04_pseudo_label.py --run "$RUN" --cycle 1 "${SETTINGS[@]}"
"$PY" stages/05_train_cell.py --run "$RUN" --cycle 1 "${SETTINGS[@]}"
"$PY" stages/04_pseudo_label.py --run "$RUN" --cycle 2 "${SETTINGS[@]}"
"$PY" stages/05_train_cell.py --run "$RUN" --cycle 2 "${SETTINGS[@]}"
"$PY" stages/05_train_cell.py --run "$RUN" --oracle "${SETTINGS[@]}"
"$PY" stages/06_predict.py --run "$RUN" --split test "${SETTINGS[@]}"
"$PY" stages/07_evaluate.py --run "$RUN" "${SETTINGS[@]}"

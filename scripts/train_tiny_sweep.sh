#!/usr/bin/env bash
# The GPU recipe for the bundled models: train a few schedules of "tiny" and "tiny-draft" side by
# side on one GPU (each model is far too small to fill it), then keep, for each model, the run
# with the lowest perplexity on the held-out *monitor* stories (never the reported ones; see
# scripts/train_tiny.py) and copy it to OUT_DIR.
#
#   bash scripts/train_tiny_sweep.sh [CORPUS] [OUT_DIR]
#   TINY_STEPS="1000 2000" DRAFT_STEPS="" MINUTES=6 bash scripts/train_tiny_sweep.sh
#
# An entry is STEPS or STEPS,--flag=value,... (extra train_tiny.py flags for that run), e.g.
# TINY_STEPS="1500,--dropout=0.2 2000,--dropout=0.3,--books-share=0.4". An empty list trains
# nothing for that model. TOKENIZER=DIR reuses a tokenizer instead of training one.
# Logs and every candidate stay in $WORK (default /tmp/tiny_sweep).
set -euo pipefail
CORPUS=${1:-../shared/corpus}
OUT_DIR=${2:-engine/bundled}
WORK=${WORK:-/tmp/tiny_sweep}
PY=${PY:-python3}
# The grids the bundled models were picked from. A second tiny grid with heavier dropout
# ("1500,--dropout=0.2 2000,--dropout=0.3 2000,--dropout=0.3,--books-share=0.4 2500,--dropout=0.4")
# wins on perplexity but its greedy output loops more; see engine/bundled/tiny/training_report.json.
TINY_STEPS=${TINY_STEPS-"1000 2000 4000 8000"}
DRAFT_STEPS=${DRAFT_STEPS-"2000 4000 8000"}
MINUTES=${MINUTES:-6}
TOKENIZER=${TOKENIZER:-}
export PYTHONUNBUFFERED=1

rm -rf "$WORK"
mkdir -p "$WORK"
# One tokenizer for every run, so the kept tiny and tiny-draft share it exactly.
if [ -z "$TOKENIZER" ]; then
    $PY scripts/train_tiny.py --corpus "$CORPUS" --out-dir "$WORK" --tokenizer-only
    TOKENIZER=$WORK/tokenizer
fi

pids=()
run() {  # run MODEL STEPS[,--flag=value...]
    local steps=${2%%,*} extra="" tag
    [[ $2 == *,* ]] && extra=${2#*,}
    tag=$(printf %s "$2" | tr -c 'A-Za-z0-9.=\n' '_' | tr -s '_')
    local flag=--max-steps
    [ "$1" = tiny-draft ] && flag=--draft-max-steps
    # shellcheck disable=SC2086
    $PY scripts/train_tiny.py --corpus "$CORPUS" --tokenizer "$TOKENIZER" \
        --out-dir "$WORK/$1-$tag" --models "$1" "$flag" "$steps" --minutes "$MINUTES" \
        ${extra//,/ } >"$WORK/$1-$tag.log" 2>&1 &
    pids+=($!)
}
for s in $TINY_STEPS; do run tiny "$s"; done
for s in $DRAFT_STEPS; do run tiny-draft "$s"; done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
grep -h "RESULT" "$WORK"/*.log || true
if [ $status -ne 0 ]; then
    tail -n 30 "$WORK"/*.log
    exit 1
fi

$PY - "$WORK" "$OUT_DIR" <<'PY'
import json, shutil, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
for model in ("tiny", "tiny-draft"):
    runs = sorted(work.glob(f"{model}-[0-9]*/{model}/training_report.json"))
    if not runs:
        continue
    reps = [(json.loads(p.read_text()), p.parent) for p in runs]
    best, best_dir = min(reps, key=lambda r: r[0]["monitor_perplexity"])
    best["selection"] = {
        "rule": "lowest monitor_perplexity among the candidates",
        "candidates": [
            {
                "max_steps": r["hyperparameters"]["max_steps"],
                "dropout": r["hyperparameters"]["dropout"],
                "books_share": r["hyperparameters"]["books_share"],
                "weight_decay": r["hyperparameters"]["weight_decay"],
                "steps": r["steps"],
                "kept_step": r["kept_step"],
                "monitor_perplexity": r["monitor_perplexity"],
                "perplexity": r["perplexity"],
            }
            for r, _ in reps
        ],
    }
    (best_dir / "training_report.json").write_text(json.dumps(best, indent=2) + "\n")
    dest = out / model
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(best_dir, dest)
    print(f"kept {best_dir} for {model}: held-out ppl {best['perplexity']}", flush=True)
PY

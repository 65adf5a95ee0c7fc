#!/usr/bin/env bash
# The plain install works for every command: `pip install .` into a fresh venv WITHOUT the dev
# extras (whose packages could hide an undeclared dependency), then one real build of the bundled
# model, run from outside the source tree so the installed package is the one imported.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
tmp=$(mktemp -d)
# pip builds in the source tree: remove what it leaves there, unless it was there before.
leftovers=()
for made in build llm_workbench.egg-info; do [ -e "$made" ] || leftovers+=("$src/$made"); done
trap 'rm -rf "$tmp" "${leftovers[@]}"' EXIT
python3 -m venv "$tmp/venv"
# torch first, pinned, as the Makefile does: a bare `torch` requirement pulls a CUDA build.
"$tmp/venv/bin/python" -m pip install -q torch==2.13.0
"$tmp/venv/bin/python" -m pip install -q "$src"
cd "$tmp"
"$tmp/venv/bin/workbench" build --model tiny --quant fp8 --calib-size 2 --no-eval \
    --out "$tmp/engine" --db "$tmp/store.sqlite"
"$tmp/venv/bin/workbench" generate --model "$tmp/engine" --prompt "Once upon a time" \
    --max-tokens 4
echo "plain install: build and generate passed"

#!/usr/bin/env bash
# CI: the minimal install (`pip install shardema`, no extras) has no numpy and no PyYAML and
# still updates, swaps, saves, resumes (2 gloo ranks), consolidates and inspects.
# A fresh venv in a temporary directory; the checkout is copied there and installed
# non-editable, so nothing is written into the checkout. Runs .ci/minimal_smoke.py.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
started=$SECONDS
tmp=$(mktemp -d "${TMPDIR:-/tmp}/shardema-minimal.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

fail() { echo "FAIL minimal install: $*"; exit 1; }

echo "minimal install: fresh venv in $tmp"
mkdir "$tmp/checkout"
cp -R pyproject.toml README.md src "$tmp/checkout/"
rm -rf "$tmp"/checkout/src/*.egg-info
find "$tmp/checkout" -name __pycache__ -prune -exec rm -rf {} +
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
# --no-compile: no bytecode for all of torch up front (a third of the CPU time of the install).
"$py" -m pip install -q --no-compile --disable-pip-version-check torch==2.13.0 "$tmp/checkout" \
  || fail "pip install torch==2.13.0 <checkout> failed"
echo "  ok  installed torch==2.13.0 and the checkout without extras in $((SECONDS - started)) s"

for module in numpy yaml; do
  if "$py" -c "import $module" >/dev/null 2>&1; then
    "$py" -m pip list 2>/dev/null || true
    fail "'import $module' works in the minimal install: a dependency pulled it in (installed packages above)"
  fi
  echo "  ok  'import $module' fails in the minimal install"
done

# pip's --no-compile skipped the bytecode of all of torch; let the smoke's first process cache
# that of the modules it imports (in this throwaway venv), so the ranks and commands reuse it.
unset PYTHONDONTWRITEBYTECODE
smoke_started=$SECONDS
(cd "$tmp" && "$py" "$repo/.ci/minimal_smoke.py") || fail "the smoke test failed (see above)"
echo "PASS minimal install in $((SECONDS - started)) s (smoke $((SECONDS - smoke_started)) s)"

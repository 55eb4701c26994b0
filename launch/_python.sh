# Sourced by the launchers: PYTHON is the interpreter with torch and shardema installed.
# Default: the repository's .venv (README, Quick start), so no venv needs to be activated;
# else python3 on PATH. Set PYTHON=/path/to/python to choose another.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch, shardema" 2>/dev/null; then
  echo "$0: $PYTHON cannot import torch and shardema; create the venv (README, Quick start) or set PYTHON=/path/to/python" >&2
  exit 1
fi

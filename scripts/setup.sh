#!/usr/bin/env bash
# Create .venv and install shrinkflow. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
# torch first: the pinned 2.13.0 CPU wheel; anything looser pulls CUDA builds.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || .venv/bin/pip install -q "torch==2.13.0"
# The rest through uv (a well-kept installer: the same resolution from the
# same index, PyPI, in a fraction of pip's time); pip when uv cannot be had
# or fails. The torch above satisfies the pin, so uv keeps it. Bytecode is
# compiled at install, as pip does: with PYTHONDONTWRITEBYTECODE set (CI
# images do) every process would otherwise compile each import again.
if .venv/bin/pip install -q "uv>=0.9,<1" 2>/dev/null \
   && .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[test,bench]"; then :
else
  .venv/bin/pip install -q -e ".[test,bench]"
fi
# A fresh clone has no git identity in some CI images; DVC only needs a repo.
git rev-parse --git-dir >/dev/null 2>&1 || git init -q
.venv/bin/dvc config core.analytics false
# Headless Chromium (Debian's package) renders the monitoring reports in the
# tests; Playwright's own browser download cannot work offline.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif command -v sudo >/dev/null 2>&1; then APT="sudo apt-get"; else APT=""; fi
  if [ -n "$APT" ]; then
    $APT install -y -q chromium >/dev/null 2>&1 \
      || { $APT update -q >/dev/null 2>&1 && $APT install -y -q chromium >/dev/null 2>&1; } \
      || echo "warning: could not install chromium with apt; the report-rendering test will fail" >&2
  else
    echo "warning: chromium is missing and cannot be installed here (no root, no sudo); the report-rendering test will fail" >&2
  fi
fi
# sshd (Debian's openssh-server): the tests push to and pull from a real DVC
# remote over SSH on loopback (tests/test_remote_ssh.py). Only the binary is
# used: each test module starts its own sshd on a free port.
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif command -v sudo >/dev/null 2>&1; then APT="sudo apt-get"; else APT=""; fi
  if [ -n "$APT" ]; then
    $APT install -y -q openssh-server >/dev/null 2>&1 \
      || { $APT update -q >/dev/null 2>&1 && $APT install -y -q openssh-server >/dev/null 2>&1; } \
      || echo "warning: could not install openssh-server with apt; the DVC-over-SSH tests will fail" >&2
  else
    echo "warning: sshd is missing and cannot be installed here (no root, no sudo); the DVC-over-SSH tests will fail" >&2
  fi
fi
# PostgreSQL's server binaries (Debian's package): the tests run the shared
# prediction log (serve.log_url) against a throwaway cluster of their own
# (shrinkflow/pgcluster.py: initdb and pg_ctl on a loopback port).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif command -v sudo >/dev/null 2>&1; then APT="sudo apt-get"; else APT=""; fi
  if [ -n "$APT" ]; then
    $APT install -y -q postgresql >/dev/null 2>&1 \
      || { $APT update -q >/dev/null 2>&1 && $APT install -y -q postgresql >/dev/null 2>&1; } \
      || echo "warning: could not install postgresql with apt; the PostgreSQL prediction-log tests will fail" >&2
  else
    echo "warning: PostgreSQL's server (initdb, pg_ctl) is missing and cannot be installed here (no root, no sudo); the PostgreSQL prediction-log tests will fail" >&2
  fi
fi

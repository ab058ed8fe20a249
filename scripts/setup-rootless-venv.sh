#!/bin/bash
# The rootless tests run bcvk as the unprivileged user bcvk-test. When that
# user can read this checkout (e.g. /work/main) it uses .venv directly; when
# the checkout lives somewhere private (a CI clone under /root, say), install
# a copy into a world-readable venv that tests/conftest.py falls back to.
set -euo pipefail
cd "$(dirname "$0")/.."
user=bcvk-test
target=/opt/bcvk/test-venv
if ! id "$user" >/dev/null 2>&1; then
  echo "rootless venv: no user $user (run scripts/setup-rootless-user.sh)" >&2
  exit 0
fi
if runuser -u "$user" -- test -r "$PWD/bcvk/__init__.py" -a -x "$PWD/.venv/bin/python"; then
  echo "rootless venv: $user reads $PWD/.venv directly" >&2
  exit 0
fi
[[ -x $target/bin/python ]] || python3 -m venv "$target"
"$target/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps .
"$target/bin/pip" install -q --disable-pip-version-check .
chmod -R a+rX "$target"
echo "rootless venv: installed bcvk into $target for $user" >&2

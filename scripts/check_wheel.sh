#!/usr/bin/env bash
# The wheel a user installs, checked as a user runs it: build it from this checkout, install it (not editable) into
# a fresh virtual environment, and run certprune from outside the source tree. The heavy dependencies (torch,
# auto_LiRPA, ...) are borrowed from .venv through a .pth line; certprune itself comes only from the wheel, and the
# script fails if Python finds it anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation . -w "$work/dist" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log" >&2; exit 1; }
python3 -m venv "$work/env"
"$work/env/bin/pip" install --quiet --no-deps --no-index "$work"/dist/certprune-*.whl
deps=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$work/env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/zz_borrowed_dependencies.pth"
cd "$work"
where=$("$work/env/bin/python" -c 'import certprune, certprune.losses, certprune.masking, certprune.models, certprune.certify; print(certprune.__file__)')
case "$where" in "$work"/env/*) ;; *) echo "certprune was imported from $where, not from the wheel" >&2; exit 1;; esac
"$work/env/bin/certprune" --version
"$work/env/bin/certprune" -q prune "$@" --out "$work/run"
"$work/env/bin/certprune" -q verify --from "$work/run" --max 20
echo "wheel check passed: $(basename "$work"/dist/certprune-*.whl) imports from the installed wheel and runs prune + verify"

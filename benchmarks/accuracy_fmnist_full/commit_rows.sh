#!/usr/bin/env bash
# Commit the study's finished records as they appear (results.json/.md and each finished run's config, env,
# metrics and log; checkpoints stay out of git). Runs until killed; one commit per change of results.json.
#   bash benchmarks/accuracy_fmnist_full/commit_rows.sh [RESULTS_FOLDER]   # default: the study's own folder
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks/accuracy_fmnist_full}
last=""
while true; do
  sum=$(cat $OUT/results.json $OUT/ema_warmup/results.json 2>/dev/null | md5sum)
  if [ -f $OUT/results.json ] && [ "$sum" != "$last" ]; then
    files=$(.venv/bin/python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for results in (out / "results.json", out / "ema_warmup" / "results.json"):
    if not results.exists():
        continue
    print(results, results.with_suffix(".md"))
    for run in json.loads(results.read_text())["runs"]:
        d = results.parent / run["run_dir"]
        print(" ".join(str(d / n) for n in ("config.yaml", "env.json", "metrics.jsonl") if (d / n).exists()))
        log = d.parent / (d.name.split("_", 2)[2] + ".log")
        print(log if log.exists() else "")
print(" ".join(str(p) for p in sorted(out.glob("runs/*.log"))))  # output of the lanes and of each run
PY
)
    for i in 1 2 3 4 5; do
      if git add -f $files 2>/dev/null && git commit -q -m "$OUT: record of finished runs ($(date -u +%H:%M))" -- $files; then
        break
      fi
      sleep 5
    done
    last=$sum
  fi
  sleep 60
done

"""python -m ray_jobs.curate [config.yaml] [key=value ...]

CLIP-scores every image of the run's generate and derive stages once (a Ray Data actor pool, GPU
where present), applies the curate.* filter rules, and writes <run>/curate/scores.parquet.
Resumable: a rerun scores only missing shards, and re-filters with the rules as now configured.
"""

from ray_jobs._cli import main
from synth.curate import run_curate

if __name__ == "__main__":
    raise SystemExit(main("curate", run_curate))

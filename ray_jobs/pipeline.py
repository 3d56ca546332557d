"""python -m ray_jobs.pipeline [config.yaml] [key=value ...]

The whole chain (prompts, generate, dataset, train, tune, report) as one job; prints where the report is.
"""

from ray_jobs._cli import main
from synth.pipeline import run_pipeline

if __name__ == "__main__":
    raise SystemExit(main("pipeline", run_pipeline))

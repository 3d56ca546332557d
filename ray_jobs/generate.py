"""python -m ray_jobs.generate [config.yaml] [key=value ...]

Runs on the local machine (a local Ray instance is started) or, under `ray job submit`, on the
cluster named by $RAY_ADDRESS. Resumable: a rerun makes only the missing shards.
"""

from ray_jobs._cli import main
from synth.generate import run_generate

if __name__ == "__main__":
    raise SystemExit(main("generate", run_generate))

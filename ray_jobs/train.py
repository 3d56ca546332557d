"""python -m ray_jobs.train [config.yaml] [key=value ...]

Trains the train-domain x test-domain matrix (``train.experiments`` x ``train.seeds``) on the
local machine (a local Ray instance is started) or, under `ray job submit`, on the cluster named
by $RAY_ADDRESS. Resumable: finished cells are skipped, interrupted ones continue from their last
checkpoint.
"""

from ray_jobs._cli import main
from synth.train import run_train

if __name__ == "__main__":
    raise SystemExit(main("train", run_train))

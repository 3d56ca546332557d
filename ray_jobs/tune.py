"""python -m ray_jobs.tune [config.yaml] [key=value ...]

Sweeps the synthetic:real mixing ratio (``tune.ratios`` x ``tune.seeds``, ``tune.mode``) with Ray
Tune on the local machine (a local Ray instance is started) or, under `ray job submit`, on the
cluster named by $RAY_ADDRESS. Resumable: rerunning the same command after the driver was killed
restores the sweep, keeps finished trials and continues the others from their last checkpoint.
"""

from ray_jobs._cli import main
from synth.tune import run_tune

if __name__ == "__main__":
    raise SystemExit(main("tune", run_tune))

"""python -m ray_jobs.dataset [config.yaml] [key=value ...]

Builds <run>/dataset/{real,synthetic}/{train,val,test}.parquet from the real data named by
dataset.real_path (or dataset.download=true) and the run's generate stage. Runs on the driver
(no Ray workers needed at CIFAR scale); deterministic, so a rerun rewrites identical tables.
"""

from ray_jobs._cli import main
from synth.dataset import run_dataset

if __name__ == "__main__":
    raise SystemExit(main("dataset", run_dataset))

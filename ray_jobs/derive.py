"""python -m ray_jobs.derive [config.yaml] [key=value ...]

Variations, fusion and inpainting of parent images (this run's generated images, or a folder of
your own photos with derive.parents=<folder>), through the generate stage's exactly-once job.
Resumable: a rerun makes only the missing shards.
"""

from ray_jobs._cli import main
from synth.derive import run_derive

if __name__ == "__main__":
    raise SystemExit(main("derive", run_derive))

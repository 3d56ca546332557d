"""python -m ray_jobs.prompts [config.yaml] [key=value ...]"""

from ray_jobs._cli import main
from synth.prompts import run_prompts

if __name__ == "__main__":
    raise SystemExit(main("prompts", run_prompts))

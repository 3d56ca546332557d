"""python -m ray_jobs.export [config.yaml] [key=value ...]

Exports the run's dataset splits (synthetic by default; export.include_real, export.include_adversarial)
to export.dest (default <storage.root>/<run>/export) as ImageFolder, Hugging Face Parquet with a
dataset card, and WebDataset tar shards (export.formats). Resumable: a rerun writes only what is missing.
"""

from ray_jobs._cli import main
from synth.export import run_export

if __name__ == "__main__":
    raise SystemExit(main("export", run_export))

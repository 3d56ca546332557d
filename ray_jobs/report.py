"""python -m ray_jobs.report [config.yaml] [key=value ...]

Builds <run>/report/ (report.html, report.md, report.json, PNG plots) from the metrics the train
stage stored, plus dataset tables and stage summaries where present. Needs no Ray and no GPU:
run it anywhere that can read the storage root.
"""

from ray_jobs._cli import main
from synth.report import run_report

if __name__ == "__main__":
    raise SystemExit(main("report", run_report))

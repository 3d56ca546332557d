"""python -m ray_jobs.verify [--repair] [config.yaml] [key=value ...]

Reconciles the run's storage with its plan and manifests, stage by stage (missing, corrupt,
foreign-plan and stray objects; see synth/verify.py). Exit 0: the run is whole; 1: problems
remain; 2: bad input. --repair moves corrupt and foreign objects to <run>/quarantine/ and reruns
the stages with problems, which remake only what is missing; then verifies again.
"""

import sys

from ray_jobs._cli import main
from synth.verify import run_verify

REPAIR_FLAG = "--repair"


def verify_main(argv: list[str]) -> int:
    repair = REPAIR_FLAG in argv
    found: dict = {}

    def verify(cfg):
        found.update(run_verify(cfg, repair=repair))
        return found

    code = main("verify", verify, [a for a in argv if a != REPAIR_FLAG])
    return code or (1 if found.get("problems") else 0)


if __name__ == "__main__":
    raise SystemExit(verify_main(sys.argv[1:]))

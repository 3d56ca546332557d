"""Export stage: images/s, and the driver's peak RSS at two image counts (flat: the driver streams).

Builds a run's synthetic splits of N and 10N class-pattern 32 px images (10 classes, 70/10/20
train/val/test), then exports each, every format (ImageFolder, Hugging Face Parquet + card,
WebDataset), in a fresh process, as a Ray Data job (``export.in_process_max_images=0``), while a
thread samples that driver's RSS. The Ray workers are other processes: what the issue asks is
that the driver's memory does not grow with the image count.

    python benchmarks/bench_export.py                   # 3,600 and 36,000 images (export wall time 7.5 s and 22.1 s on 2 cores)
    python benchmarks/bench_export.py --images 1000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rss import peak_rss  # noqa: E402  (benchmarks/rss.py, beside this script)
from synth.config import load_config  # noqa: E402
from synth.storage import Storage  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def overrides(args, root: str) -> list[str]:
    return [
        "run=bench",
        f"storage.root={root}",
        f"prompts.classes=[{','.join(CLASSES)}]",
        f"export.formats=[{args.formats}]",
        f"export.shard_size={args.shard_size}",
        f"export.num_workers={args.workers}",
        f"export.in_process_max_images={args.in_process_max_images}",
        f"ray.local_num_cpus={args.workers + 1}",
    ]


def child(args) -> None:
    """Export the stored run once and print the driver's peak RSS and the stage's numbers."""
    from synth.export import run_export

    with peak_rss() as peak:
        start = time.perf_counter()
        summary = run_export(load_config(None, overrides(args, args.root)))
        wall = time.perf_counter() - start
    print(json.dumps({
        "images": summary["images_total"], "mode": summary["mode"], "driver_peak_rss_mib": round(peak[0] / 2**20, 1),
        "images_per_second": summary["images_per_second"], "write_seconds": summary["write_seconds"],
        "wall_seconds": round(wall, 2),
    }))  # fmt: skip


def measure(args, images: int) -> dict:
    from synth.testkit import write_class_aware_dataset

    per = images // len(CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "store")
        write_class_aware_dataset(Storage(root), "bench", CLASSES, {"train": per * 7 // 10, "val": per // 10, "test": per * 2 // 10},
                                  domains=("synthetic",))  # fmt: skip
        cmd = [sys.executable, __file__, "--child", "--root", root, "--formats", args.formats, "--shard-size", str(args.shard_size),
               "--workers", str(args.workers), "--in-process-max-images", str(args.in_process_max_images)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3600, help="the smaller count; the larger is 10x")
    parser.add_argument("--formats", default="imagefolder,huggingface,webdataset")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-process-max-images", type=int, default=0, help="0: a Ray Data job at every size")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_export.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs = [measure(args, n) for n in (args.images, 10 * args.images)]
    result = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "formats": args.formats,
        "shard_size": args.shard_size,
        "workers": args.workers,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

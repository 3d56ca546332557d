"""Generation throughput: the Ray Data stage against a plain Python loop over the same generator.

Measures, for one model preset and batch size:
- images/sec of ``ShardMaker`` driven by a plain loop in this process (after one warm-up shard);
- images/sec of the full Ray Data stage (generator actors + PNG encoding + atomic shard writes),
  at steady state: from the first shard landing to the last, so actor start-up and model loading
  are excluded, and per GPU (or per CPU actor);
- their ratio (the Ray Data overhead; aim >= 0.8);
- the driver's peak RSS for N and 4N images, each in a fresh subprocess (must not grow with N).

Weights are random (tiny preset, or a full-size architecture built from its config with
``--full-size-from-config``): speed does not depend on weight values.

    python benchmarks/bench_generate.py --preset tiny --images 256 --batch-size 16
    python benchmarks/bench_generate.py --preset sd-turbo-random --images 2048 --batch-size 32  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synth.config import load_config  # noqa: E402
from synth.generate import TextToImage, shard_rows  # noqa: E402
from synth.imagejob import ImageJob, ShardMaker, run_ray_generation  # noqa: E402
from synth.prompts import build_prompt_table  # noqa: E402
from synth.storage import Storage  # noqa: E402


def build_model(preset: str, folder: Path) -> dict:
    """Model overrides for a preset; random weights, real architectures."""
    if preset == "tiny":
        from synth.testkit import build_tiny_random_sd_pipeline

        return {"generate.model": str(build_tiny_random_sd_pipeline(folder / "tiny-sd")), "generate.height": 64,
                "generate.width": 64, "generate.dtype": "float32"}  # fmt: skip
    if preset == "sd-turbo-random":
        from synth.testkit import build_full_size_random_sd_pipeline

        return {"generate.model": str(build_full_size_random_sd_pipeline(folder / "sd-turbo-random")),
                "generate.height": 512, "generate.width": 512, "generate.dtype": "bfloat16"}  # fmt: skip
    if preset == "class-aware":
        return {"generate.generator": "synth.testkit:ClassAwareTestGenerator"}
    return {"generate.model": preset}  # a local folder or a cached Hub id


def config_for(args, model_overrides: dict, images: int):
    per_class = max(1, images // 6)
    overrides = {**model_overrides, "prompts.per_class": per_class, "generate.batch_size": args.batch_size,
                 "generate.shard_size": args.shard_size, "generate.num_actors": args.actors}  # fmt: skip
    if args.resolution is not None:
        overrides["generate.height"] = overrides["generate.width"] = args.resolution
    if args.gpus_per_actor is not None:
        overrides["generate.num_gpus_per_actor"] = args.gpus_per_actor
    return load_config(REPO / "configs" / "base.yaml", [f"{k}={v}" for k, v in overrides.items()] + ["run=bench"])


def plain_loop(cfg) -> dict:
    """The same generator class, driven by a for-loop over the same shards."""
    shards = shard_rows(build_prompt_table(cfg), cfg.generate.shard_size)
    # Storage under an empty folder: the generator finds no shard stored, so it renders every one.
    maker = TextToImage(cfg.generate, list(cfg.prompts.classes))
    gen = ShardMaker(maker, Storage(tempfile.mkdtemp()), "bench", "generate", cfg.generate.batch_size)
    batch = lambda rows, k: {"shard": [k], "rows": [json.dumps(rows)]}  # noqa: E731
    gen(batch(shards[0], 0))  # warm-up: allocations, kernels, caches
    start = time.perf_counter()
    images = 0
    for k, rows in enumerate(shards[1:], start=1):
        gen(batch(rows, k))
        images += len(rows)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds}


def ray_stage(cfg) -> dict:
    """The Ray Data stage (generate + encode + write) into a temporary local root."""
    from synth.runtime import init_ray

    init_ray(cfg.ray)
    import ray

    shards = shard_rows(build_prompt_table(cfg), cfg.generate.shard_size)
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage(tmp)
        start = time.perf_counter()
        stamps = []
        plan = "0" * 64  # no plan.json: a benchmark run, not a dataset
        maker = TextToImage(cfg.generate, list(cfg.prompts.classes))
        job = ImageJob("generate", "bench", shards, {}, cfg.generate.model, maker, cfg.generate)
        for row in run_ray_generation(storage, job, list(enumerate(shards)), plan):
            stamps.append((time.perf_counter(), int(row["images"])))
    total = sum(n for _, n in stamps)
    steady_images = total - stamps[0][1]
    steady_seconds = stamps[-1][0] - stamps[0][0]
    gpus = ray.cluster_resources().get("GPU", 0)
    return {
        "images": total,
        "wall_seconds": stamps[-1][0] - start,
        "steady_images": steady_images,
        "steady_seconds": steady_seconds,
        "images_per_second": steady_images / steady_seconds if steady_seconds > 0 else float("nan"),
        "gpus": gpus,
    }


def driver_peak_rss(args, images: int) -> float:
    """Peak RSS (MiB) of a fresh driver process running the Ray stage for ``images`` images."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child-images", str(images)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "SYNTH_BENCH_CHILD": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["driver_peak_rss_mib"]


def sample_peak_rss(stop: threading.Event, peak: list) -> None:
    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny | sd-turbo-random | class-aware | <model path or id>")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="render size (default: the preset's)")
    parser.add_argument("--gpus-per-actor", type=float, default=None)
    parser.add_argument("--skip-memory", action="store_true", help="skip the 1x/4x driver-memory runs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_generate.json"))
    parser.add_argument("--child-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.preset, Path(tmp))
        if args.child_images is not None:  # a driver-memory probe: run the stage, print the peak
            stop, peak = threading.Event(), [0]
            threading.Thread(target=sample_peak_rss, args=(stop, peak), daemon=True).start()
            ray_stage(config_for(args, model, args.child_images))
            stop.set()
            print(json.dumps({"driver_peak_rss_mib": peak[0] / 2**20}))
            return
        cfg = config_for(args, model, args.images)
        loop = plain_loop(cfg)
        staged = ray_stage(cfg)
    per_worker = staged["images_per_second"] / (staged["gpus"] or args.actors)
    result = {
        "preset": args.preset,
        "images": staged["images"],
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "actors": args.actors,
        "plain_loop": loop,
        "ray_data": staged,
        "ray_images_per_second_per_worker": per_worker,
        "ray_over_plain_ratio": staged["images_per_second"] / args.actors / loop["images_per_second"],
        "device": _device(),
        "versions": _versions(),
    }
    if not args.skip_memory:
        result["driver_peak_rss_mib"] = {
            f"{args.images}": driver_peak_rss(args, args.images),
            f"{4 * args.images}": driver_peak_rss(args, 4 * args.images),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _versions() -> dict:
    import diffusers
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "ray": ray.__version__, "cuda": torch.version.cuda}  # fmt: skip


if __name__ == "__main__":
    main()

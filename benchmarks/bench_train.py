"""Training cost of the default CNN: where a train-stage cell's wall time goes, and Ray against plain PyTorch.

Two measurements, both on random 32 px images (speed does not depend on what the pixels show):

``--mode stage`` (the number the CPU path is judged by): one real train-stage cell, end to end
-- the dataset tables written in the dataset stage's format, then ``synth.train.run_train``
exactly as ``python -m ray_jobs.train`` runs it (decode, Ray Train start-up, epochs with
per-epoch validation and checkpoints, the final scoring with full test-time augmentation,
``model.pt`` and ``metrics.json``). Reported: ``steps_over_wall`` = time in optimizer steps /
the cell's wall time (aim >= 0.9), and the rest broken down (validation, final scoring,
everything else: Ray start-up, data placement, checkpoints).

``--mode arithmetic``: training-step images/s of the core on this device for each torch thread
count and ``train.precision`` (channels-last, as the core always runs), plus the memory layout
alone (one fp32 forward + backward + SGD step of the same network, contiguous vs channels-last),
all in one run, as ratios to fp32 contiguous on one thread.

``--mode loop``: images/s at steady state (epochs 2..E) of the training core
(:class:`synth.recipe.Run`) in a plain process against the same core inside a Ray Train worker
with a checkpoint and report every epoch; ``ray_over_plain`` is their ratio (aim >= 0.9).

    python benchmarks/bench_train.py --mode stage --images 27000 --val-images 3000 --test-images 6000 \\
        --width 1 --steps 420 --cpus 2 --epoch-val-images 1000   # configs/cpu.yaml's real -> real cell, ~13 min
    python benchmarks/bench_train.py --mode stage --images 27000 --val-images 3000 --test-images 6000 \\
        --width 0.5 --steps 200 --cpus 2          # a shorter CPU cell (~3 min)
    python benchmarks/bench_train.py --mode stage --images 4096 --steps 40 --width 0.25   # quick CPU check
    python benchmarks/bench_train.py --mode arithmetic --images 4096 --width 0.5   # CPU, ~2 min
    python benchmarks/bench_train.py --mode loop --images 2048 --batch-size 256 --width 0.25 --epochs 4   # CPU, ~1 min
    python benchmarks/bench_train.py --mode stage                 # GPU: 45k/5k/10k images, width 1, 500 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synth.config import RayConfig, TrainConfig, load_config, to_dict  # noqa: E402
from synth.recipe import Run, bf16_is_fast, budget  # noqa: E402

CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]


def random_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, len(CLASSES), n).astype(np.int64)


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"


# --------------------------------------------------------------------------------------------
# stage: one train-stage cell, end to end
# --------------------------------------------------------------------------------------------


def bench_stage(args, device: torch.device) -> dict:
    from synth.storage import Storage
    from synth.testkit import write_dataset_split
    from synth.train import run_train

    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(
            None,
            [
                "run=bench", f"storage.root={root}", f"prompts.classes=[{','.join(CLASSES)}]", "train.experiments=[real]",
                "train.test_domains=[real]", "train.seeds=[0]", f"train.width={args.width}", f"train.steps={args.steps}",
                f"train.batch_size={args.batch_size}", f"train.cpus_per_worker={args.cpus}", f"ray.local_num_cpus={max(4, args.cpus)}",
                f"train.epoch_val_images={args.epoch_val_images or 'null'}",
            ],
        )  # fmt: skip
        storage = Storage.from_config(cfg.storage)
        for split, n, seed in (("train", args.images, 1), ("val", args.val_images, 2), ("test", args.test_images, 3)):
            images, labels = random_split(n, seed)
            write_dataset_split(storage, cfg.run, "real", split, images, labels, CLASSES)
        start = time.perf_counter()
        summary = run_train(cfg, storage)
        stage_wall = time.perf_counter() - start
        metrics = storage.read_json(f"{cfg.run}/train/train-real/seed-0/metrics.json")
    wall, steps = metrics["wall_seconds"], metrics["train_seconds"]
    val = sum(h["val_seconds"] for h in metrics["history"])
    return {
        "cell_wall_seconds": wall,
        "stage_wall_seconds": round(stage_wall, 3),
        "train_step_seconds": steps,
        "per_epoch_validation_seconds": round(val, 3),
        "final_scoring_seconds": metrics["score_seconds"],
        "ray_startup_seconds": metrics["ray_startup_seconds"],
        "ray_teardown_seconds": metrics["ray_teardown_seconds"],
        "other_seconds": round(
            wall - steps - val - metrics["score_seconds"] - metrics["ray_startup_seconds"] - metrics["ray_teardown_seconds"], 3
        ),
        "steps_over_wall": round(steps / wall, 4),
        "steps_over_stage_wall": round(steps / stage_wall, 4),
        "epochs": len(metrics["history"]),
        "train_images_per_second": metrics["train_images_per_second"],
        "torch_threads": args.cpus if device.type == "cpu" else None,
        "summary_cells": summary["cells_trained"],
    }


# --------------------------------------------------------------------------------------------
# loop: the training core in a plain process vs in a Ray Train worker
# --------------------------------------------------------------------------------------------


def plain_loop(hp: dict, data: tuple, device: torch.device) -> dict:
    """The same epochs one Ray worker runs, in this process, with no Ray and no checkpoints."""
    train, val = data
    run = Run(hp, len(CLASSES), 0, device, train, val, config_hash="bench")
    ends = []
    for _ in run.fit():
        ends.append(time.time())
    per_epoch = run.budget.steps_per_epoch * run.budget.per_rank_batch
    seconds = [h["seconds"] for h in run.progress.history]
    return {
        "images_per_second": per_epoch * (len(ends) - 1) / (ends[-1] - ends[0]),
        "steps_only_images_per_second": per_epoch * (len(ends) - 1) / sum(seconds[1:]),
        "torch_threads": torch.get_num_threads(),
    }


def ray_loop(hp: dict, data: tuple, num_workers: int, use_gpu: bool) -> dict:
    """The stage's own trainer and worker loop; per-epoch wall times come back through the progress relay."""
    import ray

    from synth.progress import ProgressRelay
    from synth.train import make_trainer, worker_config

    train, val = data
    plan = budget(len(train[1]), hp["batch_size"], hp["steps"], num_workers)
    relay, ends, history = ProgressRelay(), [], []
    with tempfile.TemporaryDirectory() as folder:
        config = worker_config(hp, 0, CLASSES, ray.put(train), ray.put(val), {}, [], "bench", relay.sink)
        trainer = make_trainer(config, num_workers=num_workers, use_gpu=use_gpu, name="bench-train", storage_path=folder)
        start = time.time()

        def on_epoch(record: dict) -> None:
            ends.append(time.time())
            history.append(record)

        relay.run(trainer.fit, on_epoch)
        relay.close()
    per_epoch = plan.steps_per_epoch * plan.per_rank_batch
    return {
        "first_report_after_seconds": ends[0] - start,
        "images_per_second_per_worker": per_epoch * (len(ends) - 1) / (ends[-1] - ends[0]),
        "steps_only_images_per_second_per_worker": per_epoch * (len(history) - 1) / sum(h["seconds"] for h in history[1:]),
    }


def bench_loop(args, device: torch.device) -> dict:
    train, val = random_split(args.images, 1), random_split(args.val_images, 2)
    steps = args.epochs * budget(args.images, args.batch_size, 1, args.num_workers).steps_per_epoch
    hp = to_dict(TrainConfig(width=args.width, batch_size=args.batch_size, steps=steps, num_workers=args.num_workers))
    # On a CPU the plain side gets as many threads as a 1-CPU Ray worker, so the ratio compares loops.
    if device.type == "cpu":
        torch.set_num_threads(1)
    before = plain_loop(hp, (train, val), device)
    from synth.runtime import init_ray

    init_ray(RayConfig())
    ray_side = ray_loop(hp, (train, val), args.num_workers, device.type == "cuda")
    after = plain_loop(hp, (train, val), device)  # before and after: a drift in machine load hits both sides alike
    plain = {k: (before[k] + after[k]) / 2 for k in ("images_per_second", "steps_only_images_per_second")}
    return {
        "plain": plain | {"before": before, "after": after},
        "ray": ray_side,
        "ray_over_plain": ray_side["images_per_second_per_worker"] / plain["images_per_second"],
        "ray_over_plain_steps_only": ray_side["steps_only_images_per_second_per_worker"] / plain["steps_only_images_per_second"],
    }


# --------------------------------------------------------------------------------------------
# arithmetic: threads x precision through the core, and the layout alone
# --------------------------------------------------------------------------------------------


def _core_steps_per_second(hp: dict, data: tuple, device: torch.device, threads: int) -> float:
    """Images/s of the core's optimizer steps, epochs 2..E (the first pays for warm-up)."""
    run = Run(hp, len(CLASSES), 0, device, data[0], data[1], config_hash="bench", threads=threads)
    history = list(run.fit())
    return run.budget.steps_per_epoch * run.budget.per_rank_batch * (len(history) - 1) / sum(h["seconds"] for h in history[1:])


def _layout_steps_per_second(width: float, batch: int, device: torch.device, channels_last: bool, steps: int = 4) -> float:
    """Images/s of a plain fp32 forward + backward + SGD step, contiguous or channels-last (first step excluded)."""
    import torch.nn.functional as F

    from synth.model import build_model

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(len(CLASSES), width).to(device).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, len(CLASSES), (batch,), device=device)
    seconds = []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - tick)
    return batch * steps / sum(seconds[1:])


def bench_arithmetic(args, device: torch.device) -> dict:
    data = (random_split(args.images, 1), random_split(args.val_images, 2))
    steps = args.epochs * budget(args.images, args.batch_size, 1).steps_per_epoch
    thread_counts = (1, 2) if device.type == "cpu" else (None,)
    rows = []
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        for contiguous in (True, False):
            rows.append({"threads": threads, "precision": "float32", "layout": "contiguous" if contiguous else "channels_last",
                         "path": "plain step", "images_per_second": _layout_steps_per_second(args.width, args.batch_size, device, not contiguous)})  # fmt: skip
        for precision in ("float32", "bfloat16"):
            hp = to_dict(TrainConfig(width=args.width, batch_size=args.batch_size, steps=steps, precision=precision))
            rows.append({"threads": threads, "precision": precision, "layout": "channels_last", "path": "synth.recipe",
                         "images_per_second": _core_steps_per_second(hp, data, device, threads)})  # fmt: skip
    base = rows[0]["images_per_second"]
    for row in rows:
        row["images_per_second"] = round(row["images_per_second"], 1)
        row["over_fp32_contiguous_1_thread"] = round(row["images_per_second"] / base, 2)
    return {"rows": rows, "bf16_native": bf16_is_fast(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("stage", "arithmetic", "loop"), default="stage")
    parser.add_argument("--images", type=int, default=45_000, help="training images (random)")
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--test-images", type=int, default=10_000, help="stage mode: test images (scored once, full TTA)")
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch, as train.batch_size")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=500, help="stage mode: train.steps")
    parser.add_argument("--epochs", type=int, default=6, help="loop / arithmetic mode: epochs per run; the first is excluded")
    parser.add_argument("--cpus", type=int, default=1, help="stage mode: train.cpus_per_worker (torch threads on a CPU)")
    parser.add_argument("--epoch-val-images", type=int, default=None, help="stage mode: train.epoch_val_images (default: all)")
    parser.add_argument("--num-workers", type=int, default=1, help="loop mode: Ray Train workers")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/bench_train_<mode>.json)")
    args = parser.parse_args()

    device = _device(args.device)
    result = {"stage": bench_stage, "arithmetic": bench_arithmetic, "loop": bench_loop}[args.mode](args, device)
    import ray

    result = {
        "mode": args.mode,
        "args": vars(args),
        **result,
        "device": _device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "cuda": torch.version.cuda},
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"bench_train_{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

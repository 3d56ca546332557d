"""Training throughput of the default CNN: Ray Train against a plain PyTorch loop, same everything.

Both sides run the same code from ``synth.train`` on the same random uint8 images: the model
(``build_model`` + whitening init), optimizer and schedule (``make_optimizer``), one epoch of
steps (``train_epoch``: device-side flips and crops, bf16 + channels_last on a GPU) and a
validation pass per epoch (``evaluate``). The Ray side is the real stage path
(``make_trainer`` + ``train_loop_per_worker``), so it also pays for what the stage needs and a
bare loop does not: a checkpoint (model + optimizer) written and reported every epoch.

Measured, excluding the first epoch of each side (start-up, cuDNN autotuning, lazy inits):
- plain loop: images/s over whole epochs (steps + validation), run before and after the Ray
  side and averaged, so a drift in machine load hits both sides alike;
- Ray Train: images/s per worker over whole epochs as seen by the worker (steps + validation +
  checkpoint + ``ray.train.report``), from the wall-clock time after each report;
- ``ray_over_plain``: their ratio (aim >= 0.9, i.e. <= 10% overhead at steady state), and the
  same ratio over training steps only, which isolates per-step overhead (DDP wrapping etc.).

Throughput does not depend on what the pixels show, so the data is random.

    python benchmarks/bench_train.py --images 2048 --batch-size 256 --width 0.25 --epochs 4   # CPU, ~1 min
    python benchmarks/bench_train.py                                                          # GPU: 50k images, width 1
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

from synth.config import RayConfig, TrainConfig, to_dict  # noqa: E402
from synth.model import build_model  # noqa: E402
from synth.train import (  # noqa: E402
    STATE_FILE,
    _to_device_images,
    budget,
    evaluate,
    make_optimizer,
    make_trainer,
    train_epoch,
    worker_config,
)


def plain_loop(hp: dict, data: tuple, epochs: int, device: torch.device, num_classes: int) -> dict:
    """The same epochs as one Ray worker runs, in this process, with no Ray at all.

    ``data``: ``(train images (N, 32, 32, 3) uint8, train labels, val images, val labels)``.
    """
    x, y, xv, yv = data
    plan = budget(len(x), hp["batch_size"], hp["steps"], 1)
    torch.manual_seed(0)
    images, labels = _to_device_images(x, device), torch.from_numpy(y).to(device)
    val_images, val_labels = _to_device_images(xv, device), torch.from_numpy(yv).to(device)
    model = build_model(num_classes, hp["width"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.init_whitening(images[:5000].float() / 255.0)
    optimizer, scheduler = make_optimizer(model, hp, hp["steps"])
    ends, step_seconds = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        steps, batch = plan["steps_per_epoch"], plan["per_rank_batch"]
        train_epoch(model, optimizer, scheduler, images, labels, batch, steps, hp["translate"], hp["label_smoothing"])
        _sync(device)
        step_seconds.append(time.perf_counter() - start)
        evaluate(model, val_images, val_labels, hp["eval_batch_size"], hp["tta_level"]).cpu()
        ends.append(time.time())
    per_epoch = plan["steps_per_epoch"] * plan["per_rank_batch"]
    return {
        "epoch_end_times": ends,
        "images_per_second": per_epoch * (epochs - 1) / (ends[-1] - ends[0]),
        "steps_only_images_per_second": per_epoch * (epochs - 1) / sum(step_seconds[1:]),
        "torch_threads": torch.get_num_threads(),
    }


def ray_train(hp: dict, data: tuple, num_workers: int, use_gpu: bool, num_classes: int) -> dict:
    """The stage's own trainer and worker loop, storing checkpoints in a temporary folder."""
    import ray

    x, y, xv, yv = data
    plan = budget(len(x), hp["batch_size"], hp["steps"], num_workers)
    with tempfile.TemporaryDirectory() as folder:
        config = worker_config(hp, 0, num_classes, ray.put((x, y)), ray.put((xv, yv)), "bench")
        trainer = make_trainer(config, num_workers=num_workers, use_gpu=use_gpu, name="bench-train", storage_path=folder)
        start = time.time()
        result = trainer.fit()
        wall = time.time() - start
        with result.checkpoint.as_directory() as ckpt:
            history = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=True)["history"]
            checkpoint_mib = os.path.getsize(os.path.join(ckpt, STATE_FILE)) / 2**20
    ends = result.return_value["report_times"]
    per_epoch_per_worker = plan["steps_per_epoch"] * plan["per_rank_batch"]
    return {
        "wall_seconds_including_startup": wall,
        "first_report_after_seconds": ends[0] - start,
        "epoch_end_times": ends,
        "images_per_second_per_worker": per_epoch_per_worker * (len(ends) - 1) / (ends[-1] - ends[0]),
        "steps_only_images_per_second_per_worker": per_epoch_per_worker
        * (len(history) - 1)
        / sum(h["seconds"] for h in history[1:]),
        "checkpoint_mib": checkpoint_mib,
        "torch_threads": result.return_value["torch_threads"],
        "final_train_loss": history[-1]["train_loss"],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000, help="training images (random)")
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch, as train.batch_size")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per side; the first is excluded")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_train.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, args.classes, args.images).astype(np.int64)
    xv = rng.integers(0, 256, (args.val_images, 32, 32, 3), dtype=np.uint8)
    yv = rng.integers(0, args.classes, args.val_images).astype(np.int64)
    steps_per_epoch = budget(args.images, args.batch_size, 1, args.num_workers)["steps_per_epoch"]
    steps = args.epochs * steps_per_epoch
    hp = to_dict(TrainConfig(width=args.width, batch_size=args.batch_size, steps=steps, num_workers=args.num_workers))
    data = (x, y, xv, yv)

    # 1. Plain PyTorch. On a CPU it gets as many threads as a Ray worker (Ray gives a 1-CPU
    #    worker OMP_NUM_THREADS=1), so the ratio compares loops, not thread counts.
    if device.type == "cpu":
        torch.set_num_threads(1)
    plain_before = plain_loop(hp, data, args.epochs, device, args.classes)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. Ray Train, on a private local instance.
    from synth.runtime import init_ray

    init_ray(RayConfig())
    ray_side = ray_train(hp, data, args.num_workers, device.type == "cuda", args.classes)

    # 3. Plain again: the mean of the runs before and after Ray evens out drifts in machine load.
    plain_after = plain_loop(hp, data, args.epochs, device, args.classes)
    plain = {k: (plain_before[k] + plain_after[k]) / 2 for k in ("images_per_second", "steps_only_images_per_second")}
    plain |= {"before": plain_before, "after": plain_after}

    import ray

    result = {
        "what": "training images/s of synth.model at steady state (epochs 2..E): Ray Train worker loop vs plain PyTorch loop",
        "images": args.images,
        "val_images": args.val_images,
        "classes": args.classes,
        "batch_size": args.batch_size,
        "width": args.width,
        "epochs": args.epochs,
        "steps_per_epoch": steps_per_epoch,
        "num_workers": args.num_workers,
        "plain": plain,
        "ray": ray_side,
        "ray_over_plain": ray_side["images_per_second_per_worker"] / plain["images_per_second"],
        "ray_over_plain_steps_only": ray_side["steps_only_images_per_second_per_worker"] / plain["steps_only_images_per_second"],
        "device": _device_name(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "cuda": torch.version.cuda,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("plain", "ray")}, indent=2))
    print(
        f"plain {plain['images_per_second']:.0f} img/s | Ray Train {ray_side['images_per_second_per_worker']:.0f} img/s/worker "
        f"| ratio {result['ray_over_plain']:.3f} (steps only {result['ray_over_plain_steps_only']:.3f}) -> {args.out}"
    )


if __name__ == "__main__":
    main()

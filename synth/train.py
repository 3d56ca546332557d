"""The train stage: the train-domain x test-domain matrix, one CNN, one budget, several seeds.

Three layers, in Ray's idiom, top to bottom in this file:

1. :func:`train_loop_per_worker` -- plain PyTorch, run by every Ray Train worker (DDP rank); the
   few Ray lines are marked ``# [ray]``. Data lives on the device as uint8; flips and random
   crops happen on the device; SGD-Nesterov with a warmup/decay schedule counted in optimizer
   steps; bf16 autocast and channels_last on GPUs, fp32 on CPUs. Each epoch it evaluates the
   validation split (never a test split) and reports metrics with a checkpoint; after a failure
   (a worker, or the whole driver) it resumes from the latest checkpoint.
2. :func:`train_experiment` -- the driver for one (train domain, seed) cell: a ``TorchTrainer``
   whose run name and storage folder are deterministic, so rerunning the same config resumes
   the same Ray Train run (Train V2 restores the latest checkpoint by itself). Then the final
   model is evaluated on every requested test split, on a GPU when there is one.
3. :func:`run_train` -- every cell of ``train.experiments x train.seeds``; cells whose
   ``metrics.json`` already holds the same config hash are skipped; writes ``summary.json``.

The recipe is airbench94's (KellerJordan/cifar10-airbench) in PyTorch units, on the batch-mean
loss, at the default ``batch_size=1024``: lr 1.5 (x64 for BatchNorm biases), Nesterov momentum
0.85, weight decay 1.33e-3 (/64 for BatchNorm biases), label smoothing 0.2, lr factor 0.2 -> 1
over the first 23% of steps then -> 0.07, whitening-stem bias trained for the first 30% of steps,
random flips and 2-px reflect-padded crops, and mirror + shift test-time augmentation. Omitted:
airbench's lookahead EMA and alternating flips (small gains; simpler resumption without them).

Experiments and storage (``<run>/train/<experiment>/seed-<seed>/``):

- experiments ``train-real``, ``train-synthetic``, ``train-mixture``: train on that domain's
  train split; the mixture draws ``train.mixture_synthetic_fraction`` of a fixed-size set
  (min of the two train splits) from synthetic images and the rest from real ones; validation
  uses the same domain (the mixture: both val splits mixed in the same proportion);
- every model is tested on ``real``, ``synthetic`` and ``mixture`` (the union of both tests);
- ``metrics.json`` (schema in :func:`train_experiment`), ``model.pt`` (:func:`synth.model.load_model`),
  ``ray/<name>/`` (Ray Train's run folder: checkpoints, of which the 2 newest are kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synth.config import Config, TrainConfig, to_dict
from synth.model import (
    architecture,
    build_model,
    check_architecture,
    load_model,
    model_bytes,
    predict_logits,
    tta_logits,
)
from synth.storage import Layout, Storage

log = logging.getLogger(__name__)

TRAIN_DOMAINS = ("real", "synthetic", "mixture")
TEST_DOMAINS = ("real", "synthetic", "mixture")
STATE_FILE = "state.pt"  # inside every Ray Train checkpoint folder

# airbench94 constants that are part of the recipe, not knobs worth a config key.
REFERENCE_BATCH = 1024  # train.lr is per this many images (linear scaling rule)
BIAS_LR_SCALE = 64.0  # BatchNorm biases: lr x64, weight decay /64 (same decay per step)
LR_START, LR_END = 0.2, 0.07  # lr factor at step 0 and at the last step; 1.0 at the warmup's end
WHITEN_BIAS_FRACTION = 0.3  # the stem's bias trains for this share of steps, then stays put
WHITEN_IMAGES = 5000  # images used to estimate the stem's patch covariance
MIN_IMAGE_SIZE = 9  # the stem and three 2x poolings need at least this many pixels a side
MIXTURE_SEED = 0  # which images make up the mixture: fixed, so seeds vary only the training
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"  # see make_trainer


def experiment_name(train_domain: str) -> str:
    return f"train-{train_domain}"


# ============================================================================================
# 1. Worker: plain PyTorch building blocks, then the loop Ray Train runs on every rank
# ============================================================================================


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Piecewise-linear schedule over optimizer steps: 0.2 -> 1 (warmup) -> 0.07 (last step)."""
    peak = warmup_fraction * total_steps
    if step < peak:
        return LR_START + (1.0 - LR_START) * step / peak
    return 1.0 + (LR_END - 1.0) * (step - peak) / max(total_steps - peak, 1.0)


def make_optimizer(model: nn.Module, hp: dict, total_steps: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD-Nesterov with airbench's three parameter groups and its step-based schedule.

    ``hp`` is ``TrainConfig`` as a dict. Groups: BatchNorm biases (lr x64, decay /64: their
    per-step decay stays equal), the whitening stem's bias (frozen after 30% of the steps by a
    zero lr, which -- unlike toggling requires_grad -- is safe under DDP), everything else.
    """
    lr = hp["lr"] * hp["batch_size"] / REFERENCE_BATCH
    wd = hp["weight_decay"]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for n, p in named if ".norm" in n]
    whiten_bias = [p for n, p in named if n == "whiten.bias"]
    other = [p for n, p in named if ".norm" not in n and n != "whiten.bias"]
    groups = [
        {"params": norm_biases, "lr": lr * BIAS_LR_SCALE, "weight_decay": wd / BIAS_LR_SCALE},
        {"params": whiten_bias, "lr": lr, "weight_decay": wd},
        {"params": other, "lr": lr, "weight_decay": wd},
    ]
    optimizer = torch.optim.SGD(groups, momentum=hp["momentum"], nesterov=hp["momentum"] > 0)
    warmup = hp["warmup_fraction"]
    whiten_steps = WHITEN_BIAS_FRACTION * total_steps

    def main(step: int) -> float:
        return lr_factor(step, total_steps, warmup)

    def stem(step: int) -> float:
        return lr_factor(step, total_steps, warmup) if step < whiten_steps else 0.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [main, stem, main])


def flip_and_crop(x: torch.Tensor, translate: int) -> torch.Tensor:
    """Random horizontal flips and random crops after reflect padding, on x's device, no syncs.

    ``x``: float (B, C, H, W). Each image gets its own flip and (dy, dx) shift in
    [-translate, translate]; the crop is selected with ``torch.where`` over the few possible
    shifts, so nothing waits on the host (boolean-mask indexing would).
    """
    b, _, h, w = x.shape
    flip = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
    x = torch.where(flip, x.flip(-1), x)
    if translate == 0:
        return x
    pad = translate
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    shifts = torch.randint(0, 2 * pad + 1, (b, 2), device=x.device)
    rows = padded[:, :, 0:h, :]  # (B, C, H, W+2p)
    for s in range(1, 2 * pad + 1):
        rows = torch.where((shifts[:, 0] == s).view(b, 1, 1, 1), padded[:, :, s : s + h, :], rows)
    out = rows[:, :, :, 0:w]  # (B, C, H, W)
    for s in range(1, 2 * pad + 1):
        out = torch.where((shifts[:, 1] == s).view(b, 1, 1, 1), rows[:, :, :, s : s + w], out)
    return out


def _autocast(device: torch.device):
    # bf16 on GPUs (BatchNorm and the loss stay fp32 under autocast); CPUs train in fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) numpy -> uint8 (N, 3, H, W) on the device (4x smaller than fp32)."""
    # np.require copies only arrays that are read-only (object store) or strided (rank slices).
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2).contiguous()


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    steps: int,
    translate: int,
    label_smoothing: float,
) -> torch.Tensor:
    """``steps`` optimizer steps over a fresh permutation of one rank's data; returns the loss sum.

    ``images``: uint8 (N, 3, H, W) and ``labels``: int64 (N,), both on the training device.
    The sum stays on the device so the loop never waits for the host.
    """
    device = images.device
    model.train()
    order = torch.randperm(len(images), device=device)
    loss_sum = torch.zeros((), device=device)
    for i in range(steps):
        idx = order[i * batch_size : (i + 1) * batch_size]
        x = flip_and_crop(images[idx].float().div_(255.0), translate)  # (b, 3, H, W) in [0, 1]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits = model(x)  # (b, K)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, tta_level: int) -> torch.Tensor:
    """(correct, summed cross-entropy, count) on the device for uint8 (N, 3, H, W) images."""
    device = images.device
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float().div_(255.0)
        y = labels[start : start + batch_size]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits = tta_logits(model, x, tta_level).float()  # (b, K)
        totals[0] += (logits.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(logits, y, reduction="sum")
        totals[2] += len(y)
    return totals


def save_state(path: str, model: nn.Module, optimizer, scheduler, progress: dict) -> None:
    """Everything needed to continue training exactly where it stopped, in one file."""
    torch.save(
        {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "architecture": _unwrap(model).signature,
            **progress,  # epoch, step, history, config_hash, resumed_from_epochs
        },
        path,
    )


def restore_state(path: str, model: nn.Module, optimizer=None, scheduler=None, config_hash: Optional[str] = None) -> dict:
    """Load a :func:`save_state` file into the model (and optimizer, scheduler); returns it.

    Raises :class:`synth.model.ArchitectureMismatchError` naming the differing fields if the
    checkpoint was made for another network (width, class count, ...), and ``ValueError`` if it
    was made with another training recipe -- before any tensor is copied.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_architecture(_unwrap(model).signature, state.get("architecture"), f"checkpoint {path}")
    if config_hash is not None and state.get("config_hash") != config_hash:
        raise ValueError(
            f"checkpoint {path} was written with train config {state.get('config_hash')!r}, this run is "
            f"{config_hash!r}. Fix: rerun with the original config, or delete that checkpoint folder"
        )
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        torch.distributed.all_reduce(t)
    return t


def budget(train_images: int, batch_size: int, steps: int, world_size: int) -> dict:
    """How the step budget maps onto epochs for a training set split across ``world_size`` ranks.

    Every rank runs the same number of steps per epoch (DDP needs that): the smallest shard,
    ``train_images // world_size``, in whole per-rank batches; the last epoch stops at ``steps``.
    """
    per_rank_batch = batch_size // world_size
    steps_per_epoch = (train_images // world_size) // per_rank_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size={batch_size} needs at least that many training images, and there are {train_images}. "
            "Fix: lower train.batch_size or add training data"
        )
    return {
        "per_rank_batch": per_rank_batch,
        "steps_per_epoch": steps_per_epoch,
        "epochs": math.ceil(steps / steps_per_epoch),
    }


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker (DDP rank): train, validate each epoch, checkpoint each epoch.

    ``config`` (built by :func:`worker_config`): ``hp`` (TrainConfig as a dict), ``seed``,
    ``num_classes``, ``config_hash``, and ``train`` / ``val``: object refs to
    ``(images uint8 (N, H, W, 3), labels int64 (N,))``. Returns (rank 0's is kept by Ray) the
    wall-clock time after each report of this attempt, for the benchmark.
    """
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    hp, seed = config["hp"], config["seed"]
    context = ray.train.get_context()  # [ray]
    rank, world = context.get_world_rank(), context.get_world_size()  # [ray]
    device = ray.train.torch.get_device()  # [ray]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once

    # 1. Data: this rank's slice (rank::world) of the training set, uint8 on the device.
    train_images, train_labels = ray.get(config["train"])  # [ray] zero-copy from the object store
    val_images, val_labels = ray.get(config["val"])  # [ray]
    plan = budget(len(train_images), hp["batch_size"], hp["steps"], world)
    x_train = _to_device_images(train_images[rank::world], device)  # (n, 3, H, W) uint8
    y_train = torch.from_numpy(np.require(train_labels[rank::world], requirements=["C", "W"])).to(device)
    x_val = _to_device_images(val_images[rank::world], device)
    y_val = torch.from_numpy(np.require(val_labels[rank::world], requirements=["C", "W"])).to(device)

    # 2. Model: same seed on every rank; the stem whitens patches of the same images everywhere.
    torch.manual_seed(seed)
    model = build_model(config["num_classes"], hp["width"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.init_whitening(_to_device_images(train_images[:WHITEN_IMAGES], device).float() / 255.0)
    optimizer, scheduler = make_optimizer(model, hp, hp["steps"])

    # 3. Resume: the latest checkpoint of this run, after a worker or driver failure.
    progress: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "history": [],
        "config_hash": config["config_hash"],
        "resumed_from_epochs": [],
    }
    checkpoint = ray.train.get_checkpoint()  # [ray]
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = restore_state(os.path.join(folder, STATE_FILE), model, optimizer, scheduler, config["config_hash"])
        progress = {k: state[k] for k in progress}
        progress["resumed_from_epochs"] = [*progress["resumed_from_epochs"], progress["epoch"]]
        print(f"[synth.train] rank {rank}: resumed from epoch {progress['epoch']}, step {progress['step']}")
    model = ray.train.torch.prepare_model(model)  # [ray] DDP when world > 1 (rank 0's weights win)

    # 4. Epochs until the step budget is spent.
    report_times = []
    for epoch in range(progress["epoch"] + 1, plan["epochs"] + 1):
        torch.manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)  # order and augmentation
        steps = min(plan["steps_per_epoch"], hp["steps"] - progress["step"])
        start = time.perf_counter()
        loss_sum = train_epoch(
            model, optimizer, scheduler, x_train, y_train, plan["per_rank_batch"], steps, hp["translate"], hp["label_smoothing"]
        )
        train_loss = _all_reduce_sum(loss_sum / steps, world) / world
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        val = _all_reduce_sum(evaluate(_unwrap(model), x_val, y_val, hp["eval_batch_size"], hp["tta_level"]), world)
        progress["epoch"], progress["step"] = epoch, progress["step"] + steps
        metrics = {
            "epoch": epoch,
            "step": progress["step"],
            "train_loss": float(train_loss),
            "val_accuracy": float(val[0] / max(val[2], 1)),
            "val_loss": float(val[1] / max(val[2], 1)),
            "seconds": round(seconds, 4),
        }
        progress["history"] = [*progress["history"], metrics]
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:  # one copy of the (identical) DDP weights is enough
                save_state(os.path.join(folder, STATE_FILE), model, optimizer, scheduler, progress)
                checkpoint = ray.train.Checkpoint.from_directory(folder)  # [ray]
            ray.train.report(metrics, checkpoint=checkpoint)  # [ray] every rank: it is a barrier
        report_times.append(time.time())
    return {"report_times": report_times, "epochs": plan["epochs"], "torch_threads": torch.get_num_threads()}


# ============================================================================================
# 2. Data: the dataset stage's Parquet splits, decoded once on the driver
# ============================================================================================


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indexing the config's classes

    def __len__(self) -> int:
        return len(self.labels)


def read_split(storage: Storage, run: str, domain: str, split: str, classes: list[str]) -> Split:
    """One stored split (``<run>/dataset/<domain>/<split>.parquet``) as arrays.

    The dataset stage has already dropped (and counted) undecodable images. This also checks that
    every row's ``class_name`` is ``classes[label]``: a mismatch means the dataset was built for
    another class list, and training on it would be silently wrong.
    """
    from synth.dataset import decode_images, load_split_table

    table = load_split_table(storage, run, domain, split)
    where = storage.uri(Layout(run).dataset_split(domain, split))
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    names = table.column("class_name").to_pylist()
    bad = [(int(y), n) for y, n in zip(labels, names) if not (0 <= y < len(classes)) or classes[y] != n]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} rows have labels that do not match prompts.classes={classes} "
            f"(first: label {bad[0][0]}, class_name {bad[0][1]!r}). Fix: rebuild the dataset with this class list"
        )
    images = decode_images(table)  # (N, S, S, 3) uint8
    if len(images) and images.shape[1] < MIN_IMAGE_SIZE:
        raise ValueError(f"{where}: images are {images.shape[1]} px; the CNN needs at least {MIN_IMAGE_SIZE}")
    return Split(images, labels)


def _concat(*splits: Split) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def mixture(real: Split, synthetic: Split, synthetic_fraction: float, seed: int = MIXTURE_SEED) -> Split:
    """A fixed-size mix: ``min(len(real), len(synthetic))`` images, that fraction synthetic.

    The size does not depend on the fraction, so a sweep over fractions compares like with like
    (0 is a real-only subset, 1 a synthetic-only one). Order is shuffled; the draw is seeded.
    """
    rng = np.random.default_rng(seed)
    size = min(len(real), len(synthetic))
    n_syn = int(round(synthetic_fraction * size))
    take_syn = rng.permutation(len(synthetic))[:n_syn]
    take_real = rng.permutation(len(real))[: size - n_syn]
    images = np.concatenate([synthetic.images[take_syn], real.images[take_real]])
    labels = np.concatenate([synthetic.labels[take_syn], real.labels[take_real]])
    order = rng.permutation(len(labels))
    return Split(images[order], labels[order])


@dataclass
class ExperimentData:
    """Every split a set of experiments needs, decoded once and shared by all cells."""

    splits: dict[str, Split] = field(default_factory=dict)  # "real/train", "synthetic/test", ...

    @classmethod
    def load(cls, cfg: Config, storage: Storage, train_domains: Iterable[str], test_domains: Iterable[str]) -> "ExperimentData":
        needed: set[tuple[str, str]] = set()
        for d in train_domains:
            for domain in ("real", "synthetic") if d == "mixture" else (d,):
                needed |= {(domain, "train"), (domain, "val")}
        for d in test_domains:
            needed |= {(dom, "test") for dom in (("real", "synthetic") if d == "mixture" else (d,))}
        classes = list(cfg.prompts.classes)
        return cls({f"{dom}/{sp}": read_split(storage, cfg.run, dom, sp, classes) for dom, sp in sorted(needed)})

    def train_val(self, train_domain: str, synthetic_fraction: float) -> tuple[Split, Split]:
        if train_domain == "mixture":
            return tuple(  # type: ignore[return-value]
                mixture(self.splits[f"real/{sp}"], self.splits[f"synthetic/{sp}"], synthetic_fraction) for sp in ("train", "val")
            )
        return self.splits[f"{train_domain}/train"], self.splits[f"{train_domain}/val"]

    def test(self, test_domain: str) -> Split:
        if test_domain == "mixture":
            return _concat(self.splits["real/test"], self.splits["synthetic/test"])
        return self.splits[f"{test_domain}/test"]

    def counts(self) -> dict:
        return {k: {"images": len(s)} for k, s in sorted(self.splits.items())}


# ============================================================================================
# 3. Driver: one (train domain, seed) cell through Ray Train, then the final evaluation
# ============================================================================================


def config_hash(cfg: Config, train_domain: str, seed: int) -> str:
    """What decides a cell's result: recipe, classes, dataset config, domain, seed.

    Left out on purpose: resources (workers, GPUs, retries) and which other cells run, so a
    rerun on a different cluster still skips or resumes. The mixing fraction counts only for
    the mixture cell.
    """
    not_recipe = ("experiments", "test_domains", "seeds", "num_workers", "use_gpu", "max_failures", "eval_batch_size")
    recipe = {k: v for k, v in to_dict(cfg.train).items() if k not in not_recipe}
    if train_domain != "mixture":
        recipe.pop("mixture_synthetic_fraction")
    blob = {
        "run": cfg.run,
        "train": recipe,
        "classes": list(cfg.prompts.classes),
        "dataset": to_dict(cfg.dataset),
        "train_domain": train_domain,
        "seed": seed,
        "architecture": architecture(len(cfg.prompts.classes), cfg.train.width),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def worker_config(hp: TrainConfig | dict, seed: int, num_classes: int, train_ref, val_ref, cfg_hash: str = "") -> dict:
    """The ``train_loop_config`` :func:`train_loop_per_worker` expects (refs from ``ray.put``)."""
    hp = to_dict(hp) if dataclasses.is_dataclass(hp) else dict(hp)
    return {"hp": hp, "seed": seed, "num_classes": num_classes, "config_hash": cfg_hash, "train": train_ref, "val": val_ref}


def _ray_storage(storage: Storage, key: str):
    """(storage_path, storage_filesystem) for Ray Train: a local absolute path, or S3."""
    if not storage.is_s3:
        return storage.uri(key), None
    if storage.s3_endpoint_url:  # MinIO and friends: pyarrow needs the endpoint explicitly
        import pyarrow.fs

        scheme, _, host = storage.s3_endpoint_url.partition("://")
        fs = pyarrow.fs.S3FileSystem(
            endpoint_override=host or scheme, scheme=scheme if host else "https", region=storage.s3_region or "us-east-1"
        )
        return storage.uri(key)[len("s3://") :], fs
    return storage.uri(key), None


def _resolve_use_gpu(use_gpu: Optional[bool]) -> bool:
    import ray

    return bool(use_gpu) if use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1


def _check_train_v2() -> None:
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise ValueError(
            f"synth.train needs Ray Train V2 (its resume-by-run-name semantics). Fix: unset {V2_ENABLED_ENV_VAR} or set it to 1"
        )


def make_trainer(
    train_loop_config: dict,
    num_workers: int,
    use_gpu: bool,
    name: str,
    storage_path: str,
    storage_filesystem=None,
    max_failures: int = 0,
):
    """The ``TorchTrainer`` for :func:`train_loop_per_worker` (also used by the benchmark)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_train_v2()
    # Train V2's controller collects reports by polling workers, every 2 s by default, and a
    # worker's second unconsumed report blocks: epochs shorter than the poll interval (seconds
    # on a GPU) would all stretch to 2 s. Poll faster; an explicit setting still wins.
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = true)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=k, zero_division=0)
    return {
        "accuracy": float(np.mean(labels == predictions)) if len(labels) else 0.0,
        "n": int(len(labels)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=k).tolist(),
    }


def _predict(blob: bytes, images: dict, tta_level: int, batch_size: int) -> dict[str, np.ndarray]:
    """Predicted labels per named set of uint8 images (object refs), on a GPU when there is one."""
    import ray

    model, _ = load_model(blob)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return {
        name: predict_logits(model, ray.get(ref), tta_level, batch_size, device).argmax(1).numpy() for name, ref in images.items()
    }


def train_experiment(
    cfg: Config,
    storage: Storage,
    train_domain: str,
    seed: int,
    data: Optional[ExperimentData] = None,
    use_gpu: Optional[bool] = None,
) -> dict:
    """Train one cell (or resume it), evaluate it, store ``model.pt`` and ``metrics.json``.

    ``metrics.json``::

        {"experiment": "train-<domain>", "train_domain": ..., "seed": ..., "classes": [...],
         "architecture": {...}, "steps", "batch_size", "train_images", "num_workers",
         "history": [{"epoch", "step", "train_loss", "val_accuracy", "val_loss", "seconds"}],
         "val": {"accuracy"}, "test": {"<test domain>": M}, "wall_seconds",
         "train_images_per_second", "code_version",
         # beside the schema: "config_hash", "resumed_from_epochs", "device"}
        M = {"accuracy", "n", "per_class": {"<class>": {"precision", "recall", "f1", "support"}},
             "confusion_matrix": [[int]]}  (rows: true labels, columns: predictions)

    ``history[].seconds`` is the training time of that epoch (steps only, not validation or
    checkpointing); ``train_images_per_second`` is steps x batch_size over their sum.
    """
    import ray

    from synth.runtime import code_version

    start = time.perf_counter()
    t = cfg.train
    layout, experiment = Layout(cfg.run), experiment_name(train_domain)
    classes = list(cfg.prompts.classes)
    cfg_hash = config_hash(cfg, train_domain, seed)

    # 1. Data, checked against the budget before any worker starts.
    data = data or ExperimentData.load(cfg, storage, [train_domain], t.test_domains)
    train, val = data.train_val(train_domain, t.mixture_synthetic_fraction)
    if len(val) == 0:
        raise ValueError(
            f"the {train_domain} validation split is empty. Fix: set dataset.val_fraction > 0 and rebuild the dataset"
        )
    budget(len(train), t.batch_size, t.steps, t.num_workers)

    # 2. Ray Train. Same name + storage path on a rerun: Train V2 restores the run's latest
    #    checkpoint and get_checkpoint() hands it to the workers, so a killed driver resumes.
    use_gpu = _resolve_use_gpu(t.use_gpu if use_gpu is None else use_gpu)
    storage_path, filesystem = _ray_storage(storage, layout.train_ray_results(experiment, seed))
    trainer = make_trainer(
        worker_config(t, seed, len(classes), ray.put((train.images, train.labels)), ray.put((val.images, val.labels)), cfg_hash),
        num_workers=t.num_workers,
        use_gpu=use_gpu,
        # The hash keeps a changed recipe from resuming an old run's checkpoints.
        name=f"{cfg.run}.{experiment}.seed-{seed}.{cfg_hash}",
        storage_path=storage_path,
        storage_filesystem=filesystem,
        max_failures=t.max_failures,
    )
    log.info("train: %s seed %d on %d worker(s), gpu=%s -> %s", experiment, seed, t.num_workers, use_gpu, storage_path)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished {experiment} seed {seed} without a checkpoint; see {result.path}")

    # 3. The final model, from the last checkpoint (the state every rank agreed on).
    with result.checkpoint.as_directory() as folder:
        model = build_model(len(classes), t.width)
        state = restore_state(os.path.join(folder, STATE_FILE), model, config_hash=cfg_hash)
    provenance = {"experiment": experiment, "seed": seed, "config_hash": cfg_hash, "code_version": code_version()}
    blob = model_bytes(model, classes, provenance)
    storage.write_bytes(layout.train_model(experiment, seed), blob)

    # 4. Final evaluation of the final model: validation + every test split, in one task on a
    #    GPU when training had them (the driver may run on a CPU-only head node).
    fit_seconds = time.perf_counter() - start
    eval_sets = {"val": val, **{d: data.test(d) for d in t.test_domains}}
    predict = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_predict)
    images = {name: ray.put(s.images) for name, s in eval_sets.items()}
    predictions = ray.get(predict.remote(blob, images, t.tta_level, t.eval_batch_size))
    scores = {name: classification_metrics(eval_sets[name].labels, predictions[name], classes) for name in eval_sets}

    history = state["history"]
    train_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "experiment": experiment,
        "train_domain": train_domain,
        "seed": seed,
        "classes": classes,
        "architecture": model.signature,
        "steps": t.steps,
        "batch_size": t.batch_size,
        "train_images": len(train),
        "num_workers": t.num_workers,
        "history": history,
        "val": {"accuracy": scores["val"]["accuracy"]},
        "test": {d: scores[d] for d in t.test_domains},
        "wall_seconds": round(time.perf_counter() - start, 3),
        "train_images_per_second": round(state["step"] * t.batch_size / train_seconds, 2) if train_seconds else 0.0,
        "code_version": code_version(),
        "config_hash": cfg_hash,
        "resumed_from_epochs": list(state["resumed_from_epochs"]),
        "device": "gpu" if use_gpu else "cpu",
    }
    storage.write_json(layout.train_metrics(experiment, seed), metrics)
    log.info(
        "train: %s seed %d: val %.4f, test %s; %.1f s (Ray Train %.1f s, of which training steps %.1f s)",
        experiment,
        seed,
        metrics["val"]["accuracy"],
        {d: round(m["accuracy"], 4) for d, m in metrics["test"].items()},
        metrics["wall_seconds"],
        fit_seconds,
        train_seconds,
    )
    return metrics


# ============================================================================================
# 4. Stage: the experiment matrix, resumable cell by cell
# ============================================================================================


def _done(storage: Storage, key: str, cfg_hash: str, test_domains: list[str]) -> Optional[dict]:
    """The stored metrics of a finished cell made with this config, else None."""
    metrics = storage.read_json_or_none(key)
    if not isinstance(metrics, dict) or metrics.get("config_hash") != cfg_hash or not set(test_domains) <= set(metrics.get("test", {})):
        return None
    return metrics


def _matrix(cells: list[dict]) -> dict:
    """Mean and spread over seeds of test accuracy, per experiment and test domain."""
    out: dict[str, dict] = {}
    for m in cells:
        for test_domain, scores in m["test"].items():
            out.setdefault(m["experiment"], {}).setdefault(test_domain, []).append(scores["accuracy"])
    return {
        exp: {
            d: {"mean": float(np.mean(a)), "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0, "n": len(a), "accuracies": a}
            for d, a in row.items()
        }
        for exp, row in out.items()
    }


def run_train(cfg: Config, storage: Optional[Storage] = None) -> dict:
    """Run (or resume) every cell of ``train.experiments x train.seeds``; returns the summary.

    Writes ``<run>/train/config.yaml`` and ``<run>/train/summary.json``: per-cell status and
    accuracies, the accuracy matrix (mean/std over seeds), and the data counts.
    """
    from synth.runtime import init_ray, write_stage_config, write_stage_summary

    start = time.perf_counter()
    storage = storage or Storage.from_config(cfg.storage)
    layout, t = Layout(cfg.run), cfg.train

    # 1. Fail fast on storage; note the config; clear interrupted writes.
    storage.check_writable()
    write_stage_config(storage, cfg, "train")
    removed = storage.remove_partials(layout.stage("train"))

    # 2. Which cells are already done with this exact config.
    cells = [(d, s) for d in t.experiments for s in t.seeds]
    done = {}
    for d, s in cells:
        m = _done(storage, layout.train_metrics(experiment_name(d), s), config_hash(cfg, d, s), t.test_domains)
        if m is not None:
            done[(d, s)] = m
    todo = [c for c in cells if c not in done]
    log.info("train: %d cells, %d done, %d to train", len(cells), len(done), len(todo))

    # 3. Train the rest; the data is decoded once and shared.
    data: Optional[ExperimentData] = None
    results: dict[tuple[str, int], dict] = dict(done)
    if todo:
        data = ExperimentData.load(cfg, storage, sorted({d for d, _ in todo}), t.test_domains)
        init_ray(cfg.ray)
        for d, s in todo:
            results[(d, s)] = train_experiment(cfg, storage, d, s, data=data)

    # 4. Summary.
    ordered = [results[c] for c in cells]
    summary = {
        "cells": [
            {
                "experiment": m["experiment"],
                "seed": m["seed"],
                "status": "skipped (already done)" if c in done else "trained",
                "metrics": storage.uri(layout.train_metrics(m["experiment"], m["seed"])),
                "val_accuracy": m["val"]["accuracy"],
                "test_accuracy": {d: x["accuracy"] for d, x in m["test"].items()},
                "resumed_from_epochs": m.get("resumed_from_epochs", []),
                "wall_seconds": m["wall_seconds"],
            }
            for c, m in zip(cells, ordered)
        ],
        "accuracy": _matrix(ordered),
        "cells_total": len(cells),
        "cells_already_done": len(done),
        "cells_trained": len(todo),
        "data": data.counts() if data else None,
        "partial_writes_removed": removed,
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    return write_stage_summary(storage, cfg, "train", summary)

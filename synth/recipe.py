"""The one training core: every model synth trains, in the train stage or a tune trial, goes through here.

A :class:`Run` is one network, one training set and one recipe on one device (one DDP rank when
the train stage uses several workers). Its callers add only where the data comes from and where
reports and checkpoints go (Ray Train's worker in :mod:`synth.train`, Ray Tune's trial in
:mod:`synth.tune`), so "the train stage's mixture at fraction f, seed s" and "tune's trial at
r = f, seed s" are one computation: same images (:func:`synth.splits.mix`), same network, same
steps, same random numbers.

The recipe is airbench94's (KellerJordan/cifar10-airbench) in PyTorch units, on the batch-mean
loss, at the default ``batch_size=1024``: lr 1.5 (x64 for BatchNorm biases), Nesterov momentum
0.85, weight decay 1.33e-3 (/64 for BatchNorm biases), label smoothing 0.2, lr factor 0.2 -> 1
over the first 23% of steps then -> 0.07, whitening-stem bias trained for the first 30% of steps,
random flips and 2-px reflect-padded crops, and mirror + shift test-time augmentation. Omitted:
airbench's lookahead EMA and alternating flips (small gains; simpler resumption without them).

Evaluation costs little during training: each epoch scores the validation split with one view
per image (``tta_level`` 0); the full test-time augmentation (``train.tta_level``, 6 views at
level 2) runs once, at the end, over every split that is scored, in one batched pass.

Layout: 1. schedule and optimizer; 2. augmentation and one epoch; 3. evaluation and metrics;
4. checkpoint state; 5. the step budget; 6. :class:`Run`; 7. the hash of what decides a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synth.config import Config, label_classes, to_dict
from synth.model import Net, architecture, build_model, check_architecture, tta_logits

# airbench94 constants that are part of the recipe, not knobs worth a config key.
REFERENCE_BATCH = 1024  # train.lr is per this many images (linear scaling rule)
BIAS_LR_SCALE = 64.0  # BatchNorm biases: lr x64, weight decay /64 (same decay per step)
LR_START, LR_END = 0.2, 0.07  # lr factor at step 0 and at the last step; 1.0 at the warmup's end
WHITEN_BIAS_FRACTION = 0.3  # the stem's bias trains for this share of steps, then stays put
WHITEN_IMAGES = 5000  # images used to estimate the stem's patch covariance
MIN_IMAGE_SIZE = 9  # the stem and three 2x poolings need at least this many pixels a side
EPOCH_VAL_TTA = 0  # views per image when validating during training (the full TTA runs at the end)
STATE_FILE = "state.pt"  # the checkpoint file inside every Ray Train / Tune checkpoint folder


# ============================================================================================
# 1. Schedule and optimizer
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


# ============================================================================================
# 2. Augmentation and one epoch
# ============================================================================================


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


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively here: every CUDA GPU synth targets, CPUs with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on this device: ``auto`` is bfloat16 where it is native, else float32."""
    if precision == "auto":
        return "bfloat16" if bf16_is_fast(device) else "float32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast (BatchNorm and the loss stay fp32 under it), or plain fp32."""
    if resolve_precision(precision, device) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) numpy -> uint8 (N, 3, H, W) on the device (4x smaller than fp32)."""
    # np.require copies only arrays that are read-only (object store) or strided (rank slices).
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2).contiguous()


def to_device_labels(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.require(labels, dtype=np.int64, requirements=["C", "W"])).to(device)


def _as_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, H, W) -> float in [0, 1], channels_last (faster convolutions on GPUs and on CPUs alike)."""
    return x_uint8.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The torch seed of one epoch of one rank: decides its batch order and augmentation."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


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
    precision: str = "auto",
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
        x = flip_and_crop(_as_input(images[idx]), translate)  # (b, 3, H, W) in [0, 1]
        with autocast(device, precision):
            logits = model(x)  # (b, K)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
    return loss_sum


# ============================================================================================
# 3. Evaluation and metrics
# ============================================================================================


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, tta_level: int, precision: str = "auto"
) -> torch.Tensor:
    """(correct, summed cross-entropy, count) on the device for uint8 (N, 3, H, W) images."""
    device = images.device
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = _as_input(images[start : start + batch_size])
        y = labels[start : start + batch_size]
        with autocast(device, precision):
            logits = tta_logits(model, x, tta_level).float()  # (b, K)
        totals[0] += (logits.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(logits, y, reduction="sum")
        totals[2] += len(y)
    return totals


@torch.no_grad()
def logits(
    model: nn.Module, images: np.ndarray, batch_size: int, tta_level: int, device: torch.device, precision: str = "auto"
) -> torch.Tensor:
    """Float32 logits (N, K) on the CPU for uint8 (N, H, W, 3) images, moved to the device a batch at a time.

    The one inference path: the final scores, and any caller of a saved model (:func:`synth.model.load_model`).
    """
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = _as_input(to_device_images(images[start : start + batch_size], device))
        with autocast(device, precision):
            out.append(tta_logits(model, x, tta_level).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "signature", {}).get("num_classes", 0))


def predict(
    model: nn.Module, images: np.ndarray, batch_size: int, tta_level: int, device: torch.device, precision: str = "auto"
) -> np.ndarray:
    """Predicted labels (N,) of :func:`logits`."""
    return logits(model, images, batch_size, tta_level, device, precision).argmax(1).numpy()


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = true)."""
    k = len(classes)
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    cm = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)  # (true, predicted)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / len(labels)) if len(labels) else 0.0,
        "n": int(len(labels)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


# ============================================================================================
# 4. Checkpoint state
# ============================================================================================


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint, so a resumed run continues its history."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per epoch, see Run.fit
    config_hash: str = ""
    resumed_from_epochs: list[int] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_state(path: str, model: nn.Module, optimizer, scheduler, progress: Progress) -> None:
    """Everything needed to continue training exactly where it stopped, in one file."""
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "architecture": unwrap(model).signature,
            **asdict(progress),
        },
        path,
    )


def restore_state(path: str, model: nn.Module, optimizer=None, scheduler=None, config_hash: Optional[str] = None) -> Progress:
    """Load a :func:`save_state` file into the model (and optimizer, scheduler); returns its progress.

    Raises :class:`synth.model.ArchitectureMismatchError` naming the differing fields if the
    checkpoint was made for another network (width, class count, ...), and ``ValueError`` if it
    was made with another training recipe -- before any tensor is copied.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_architecture(unwrap(model).signature, state.get("architecture"), f"checkpoint {path}")
    if config_hash is not None and state.get("config_hash") != config_hash:
        raise ValueError(
            f"checkpoint {path} was written with train config {state.get('config_hash')!r}, this run is "
            f"{config_hash!r}. Fix: rerun with the original config, or delete that checkpoint folder"
        )
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return Progress(**{k: state[k] for k in Progress.__dataclass_fields__})


# ============================================================================================
# 5. The step budget
# ============================================================================================


@dataclass(frozen=True)
class Budget:
    per_rank_batch: int
    steps_per_epoch: int
    epochs: int


def budget(train_images: int, batch_size: int, steps: int, world_size: int = 1) -> Budget:
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
    return Budget(per_rank_batch, steps_per_epoch, -(-steps // steps_per_epoch))


def epoch_val_stride(n: int, limit: Optional[int]) -> int:
    """Every how many validation images the per-epoch check takes to stay within ``limit`` (None: all)."""
    return 1 if limit is None or n <= limit else -(-n // limit)


# ============================================================================================
# 6. One run: data on the device, the model, resumption, epochs, the final scores
# ============================================================================================


class Run:
    """One model trained with the recipe on one device (one rank of ``world``).

    ``train`` and ``val`` are ``(images uint8 (N, H, W, 3), labels int64 (N,))`` of the whole
    split; this rank keeps its slice ``rank::world``. The stem is whitened from the first
    :data:`WHITEN_IMAGES` images of the whole training set, the same on every rank.

    Callers: build, :meth:`restore` from a checkpoint if there is one, iterate :meth:`fit`
    (report and checkpoint after each epoch with :meth:`save`), then :meth:`scores`.
    """

    def __init__(
        self,
        hp: dict,
        num_classes: int,
        seed: int,
        device: torch.device,
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray],
        config_hash: str,
        rank: int = 0,
        world: int = 1,
        threads: Optional[int] = None,
    ):
        self.hp, self.seed, self.device, self.rank, self.world = hp, seed, device, rank, world
        self.precision = resolve_precision(hp["precision"], device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
        elif threads:
            torch.set_num_threads(threads)  # this run's CPUs, not every core of the node
        train_images, train_labels = train
        self.budget = budget(len(train_images), hp["batch_size"], hp["steps"], world)
        self.x_train = to_device_images(train_images[rank::world], device)  # (n, 3, H, W) uint8
        self.y_train = to_device_labels(train_labels[rank::world], device)
        every = epoch_val_stride(len(val[1]), hp["epoch_val_images"])
        self.x_val = to_device_images(val[0][::every][rank::world], device)  # per-epoch validation only
        self.y_val = to_device_labels(val[1][::every][rank::world], device)

        # Same seed on every rank, so every rank starts from the same weights.
        torch.manual_seed(seed)
        model = build_model(num_classes, hp["width"]).to(device).to(memory_format=torch.channels_last)
        model.init_whitening(to_device_images(train_images[:WHITEN_IMAGES], device).float() / 255.0)
        self.model: nn.Module = model
        self.optimizer, self.scheduler = make_optimizer(model, hp, hp["steps"])
        self.progress = Progress(config_hash=config_hash)

    @property
    def net(self) -> Net:
        return unwrap(self.model)  # type: ignore[return-value]

    def restore(self, path: str) -> None:
        """Continue from a :meth:`save` file (same recipe and network, or a clear error)."""
        progress = restore_state(path, self.model, self.optimizer, self.scheduler, self.progress.config_hash)
        progress.resumed_from_epochs = [*progress.resumed_from_epochs, progress.epoch]
        self.progress = progress

    def save(self, path: str) -> None:
        save_state(path, self.model, self.optimizer, self.scheduler, self.progress)

    @property
    def train_seconds(self) -> float:
        """Seconds of optimizer steps over every epoch trained, before a restore included."""
        return sum(h["seconds"] for h in self.progress.history)

    @property
    def done(self) -> bool:
        return self.progress.step >= self.hp["steps"]

    def fit(self, wrap: Optional[Callable[[nn.Module], nn.Module]] = None) -> Iterator[dict]:
        """Train epoch by epoch until the step budget is spent; yields each epoch's record.

        ``wrap`` (Ray Train's ``prepare_model``: DDP when world > 1) is applied after a restore,
        so rank 0's restored weights are what every rank starts from. The record:
        ``{epoch, step, train_loss, val_accuracy, val_loss, seconds, val_seconds}``, validation
        with one view per image; ``seconds`` is the time of the epoch's optimizer steps only,
        ``val_seconds`` that of its validation.
        """
        if wrap is not None:
            self.model = wrap(self.model)
        hp, b = self.hp, self.budget
        while not self.done:
            epoch = self.progress.epoch + 1
            torch.manual_seed(epoch_seed(self.seed, epoch, self.rank))  # order and augmentation
            steps = min(b.steps_per_epoch, hp["steps"] - self.progress.step)
            tick = time.perf_counter()
            loss_sum = train_epoch(
                self.model, self.optimizer, self.scheduler, self.x_train, self.y_train, b.per_rank_batch, steps,
                hp["translate"], hp["label_smoothing"], self.precision,
            )  # fmt: skip
            # float() waits for the device (a CUDA step returns before it has run): the epoch's true time.
            train_loss = float(self._all_reduce(loss_sum / steps) / self.world)
            seconds = time.perf_counter() - tick
            val = self._all_reduce(evaluate(self.net, self.x_val, self.y_val, hp["eval_batch_size"], EPOCH_VAL_TTA, self.precision))
            record = {
                "epoch": epoch,
                "step": self.progress.step + steps,
                "train_loss": train_loss,
                "val_accuracy": float(val[0] / max(float(val[2]), 1.0)),
                "val_loss": float(val[1] / max(float(val[2]), 1.0)),
                "seconds": round(seconds, 4),
                "val_seconds": round(time.perf_counter() - tick - seconds, 4),
            }
            self.progress.epoch, self.progress.step = epoch, record["step"]
            self.progress.history = [*self.progress.history, record]
            yield record

    def scores(
        self,
        sets: dict[str, tuple[np.ndarray, np.ndarray]],
        classes: Sequence[str],
        unions: Optional[dict[str, Sequence[str]]] = None,
    ) -> dict[str, dict]:
        """:func:`classification_metrics` of each named ``(images, labels)`` set, with the full TTA.

        All sets go through the model in one batched pass (``train.eval_batch_size`` images a
        batch), on this run's device; whole sets, not this rank's slice. ``unions`` names sets
        scored as the union of others (``{"mixture": ["real", "synthetic"]}``) without
        predicting any image twice.
        """
        sizes = [len(sets[n][1]) for n in sets]
        images = [sets[n][0] for n, size in zip(sets, sizes) if size]
        predicted = (
            predict(self.net, np.concatenate(images), self.hp["eval_batch_size"], self.hp["tta_level"], self.device, self.precision)
            if images
            else np.zeros(0, dtype=np.int64)
        )
        ends = np.cumsum(sizes)
        by_name = {n: (sets[n][1], predicted[end - size : end]) for n, size, end in zip(sets, sizes, ends)}
        for name, parts in (unions or {}).items():
            by_name[name] = tuple(np.concatenate([by_name[p][i] for p in parts]) for i in (0, 1))  # type: ignore[assignment]
        return {n: classification_metrics(labels, pred, classes) for n, (labels, pred) in by_name.items()}

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t


# ============================================================================================
# 7. What decides a result
# ============================================================================================

# TrainConfig fields that do not change what a model learns: which cells run, resources,
# retries, the evaluation batch. Everything else of train.* is the recipe.
NOT_RECIPE = (
    "experiments", "test_domains", "seeds", "mixture_synthetic_fraction", "num_workers", "cpus_per_worker", "use_gpu",
    "max_failures", "eval_batch_size", "ablation",
)  # fmt: skip  # ablation picks cells (its cells hash their own selection), like experiments


def result_hash(cfg: Config, **what: Any) -> str:
    """A short hash of everything that decides a trained model and its scores.

    The recipe (``train.*`` less :data:`NOT_RECIPE`), the network, the classes, the dataset
    config and the run, plus ``what`` names the cell (training set, seed, fraction, ...). The
    train stage's cells, tune's sweep and its trials all hash through here, so a rerun on a
    different cluster resumes or skips, and a changed recipe never reuses a stale result.
    """
    blob = {
        "run": cfg.run,
        "train": {k: v for k, v in to_dict(cfg.train).items() if k not in NOT_RECIPE},
        "classes": label_classes(cfg),
        "dataset": to_dict(cfg.dataset),
        "architecture": architecture(len(label_classes(cfg)), cfg.train.width),
        **what,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

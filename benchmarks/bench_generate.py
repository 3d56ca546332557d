"""Generation speed: each switch of synth's generator against a plain diffusers pipeline, in one run.

At each resolution (512 and 256 px by default), with SD-Turbo's full-size architectures (UNet, VAE,
OpenCLIP text encoder, and TAESD's for the tiny decoder) built from their configs with **random
weights** (speed depends on shapes and dtypes, not on weight values):

(a) baseline: a plain diffusers pipeline called with one prompt at a time, returning a PIL image
    resized to 32 px, as published Ray examples do;
(b) synth's generator (``DiffusersGenerator``, the generate stage's maker) with every switch off
    but one: each switch alone (batch size 1 unless the switch is the batch size);
(c) ``defaults``: synth's default switches (those that change no image) at the run's batch size,
    and ``best``: the defaults plus the tiny decoder plus each image-rounding switch
    (channels_last, compile) that was faster alone in this run;
(d) ``best`` through the real Ray Data generate stage (actor pool, PNG encoding, atomic shard
    writes), steady state (first shard landed -> last), against ``best`` in a bare loop.

Also: FLOPs per image by component, counted with ``torch.utils.flop_counter`` during warm-up; the
achieved FLOP rate of the UNet + decoder path (timed per component) as a fraction of this
machine's attainable rate, a large matmul in the same dtype and thread count, measured at the
start and the end of the run; and for each row, how far its first image is from the baseline's
(same prompt and seed, full resolution, uint8): 0 means the same bytes.

Each row: its model loaded afresh, one warm-up call (excluded; compile time is the warm-up's
excess, reported apart), then the measured calls; prompts repeat the warm-up's, so the prompt
cache is warm (in ``configs/full.yaml`` without LLM prompts 86% of rows repeat an earlier one).

On a CPU every rate is images per CPU-second of the process (torch runs ``--threads`` threads, 1
by default): process CPU time does not count time lost to other programs on a shared machine,
where wall time does; wall times are recorded too. On a GPU: wall time, bf16 (``generate.dtype``).

    python benchmarks/bench_generate.py                  # CPU ~27 min; the same command on a CUDA GPU
    python benchmarks/bench_generate.py --preset tiny    # the tiny random model: the script checked in ~3 min
    python benchmarks/bench_generate.py --driver-memory  # driver peak RSS of the stage at 9,000 and 36,000 images
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rss import peak_rss  # noqa: E402  (benchmarks/rss.py, beside this script)
from synth.config import GenerateConfig, load_config  # noqa: E402
from synth.generate import TextToImage, build_generator, shard_rows  # noqa: E402
from synth.imagejob import ImageJob, run_ray_generation  # noqa: E402
from synth.prompts import build_prompt_table  # noqa: E402
from synth.storage import Storage  # noqa: E402

CLASSES = ["bird", "cat", "deer", "dog", "frog", "horse"]
IMAGE_SIZE = 32  # the dataset's stored size
NO_LLM = ["prompts.techniques.llm=0", "prompts.techniques.environment=0.6"]  # no LLM model to load
# Every switch off: the reference for "each switch alone".
ALL_OFF = dict(prompt_cache=0, fuse_qkv=False, attention="sdpa", channels_last=False, compile=False, decoder=None)
SWITCHES = tuple(ALL_OFF)
ROUNDING = ("channels_last", "compile")  # switches that move a few pixels by 1/255: in "best" only if faster


# --------------------------------------------------------------------------------------------
# 1. Models (random weights, real architectures) and the run's settings
# --------------------------------------------------------------------------------------------


def build_models(preset: str, cache: Path) -> dict:
    """Model folders, built once into ``cache`` (build time is not measured)."""
    from synth.testkit import build_full_size_random_sd_pipeline, build_tiny_random_autoencoder_tiny, build_tiny_random_sd_pipeline

    full = preset == "sd-turbo-random"
    sd, taesd = cache / preset / "sd", cache / preset / "taesd"
    if not (sd / "model_index.json").exists():
        print(f"building {preset} (random weights) in {sd} ...", file=sys.stderr)
        (build_full_size_random_sd_pipeline if full else build_tiny_random_sd_pipeline)(sd)
    if not (taesd / "config.json").exists():
        build_tiny_random_autoencoder_tiny(taesd, full_size=full)
    return {"model": str(sd), "taesd": str(taesd)}


@dataclass
class Settings:
    cuda: bool
    dtype: str  # what generate.dtype asks for; synth runs float32 on a CPU regardless
    threads: int
    batch: int  # batch size of the batch row, defaults, best and the Ray stage
    calls: int  # measured calls per row, after one warm-up call
    resolutions: list[int]
    compile_at: list[int]  # resolutions with a compile row
    ray_shards: int  # shards through the Ray stage (the first, with start-up, is not measured)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype) if self.cuda else torch.float32


def settings(args) -> Settings:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    resolutions = args.resolutions or ([512, 256] if args.preset == "sd-turbo-random" else [64])
    return Settings(
        cuda=cuda,
        dtype="bfloat16" if cuda else "float32",
        threads=torch.get_num_threads(),
        batch=args.batch_size or (32 if cuda else 2),
        calls=args.calls or (8 if cuda else 1),
        resolutions=resolutions,
        # Compiling the UNet and VAE takes minutes on a CPU; one resolution keeps the run within 30 minutes there.
        compile_at=args.compile_at if args.compile_at is not None else (resolutions if cuda else resolutions[-1:]),
        ray_shards=args.ray_shards or (8 if cuda else 3),
    )


def call_rows(n: int, call: int) -> list[dict]:
    """The rows of measured call ``call`` (-1: the warm-up): the first ``n`` rows of the base config's
    prompt table (real templates), the same prompts in every call, seeds of the call's own."""
    cfg = load_config(REPO / "configs" / "base.yaml", NO_LLM + [f"prompts.per_class={n}", "prompts.hostile_per_class=0"])
    rows = shard_rows(build_prompt_table(cfg), n)[0]
    return [{**r, "seed": int(r["seed"]) + (10**6 if call < 0 else 7919 * call)} for r in rows]


# --------------------------------------------------------------------------------------------
# 2. Timing: whole calls and components, CPU time on a CPU, wall time on a GPU
# --------------------------------------------------------------------------------------------


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


class Clock:
    """Wall and process-CPU seconds of whole calls and of named components (wrapped methods)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def has(self, name: str) -> bool:
        return name in self.wall

    def time(self, name: str, fn, *args, **kwargs):
        sync(self.cuda)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        sync(self.cuda)
        self.wall[name] += time.perf_counter() - wall
        self.cpu[name] += time.process_time() - cpu
        return out

    def wrap(self, obj, attr: str, name: str) -> None:
        """Time every call of ``obj.attr`` under ``name`` (an instance attribute shadows the method)."""
        fn = getattr(obj, attr)
        setattr(obj, attr, lambda *a, **kw: self.time(name, fn, *a, **kw))

    def reset(self, keep=("load", "warmup")) -> None:
        for times in (self.wall, self.cpu):
            for name in set(times) - set(keep):
                del times[name]

    def seconds(self, name: str) -> float:
        """The primary measure: wall time on a GPU, process CPU time on a CPU."""
        return self.wall[name] if self.cuda else self.cpu[name]


def matmul_rate(s: Settings) -> float:
    """FLOP/s of a large matmul in the run's dtype and threads: this machine's attainable rate."""
    import torch

    n, reps = (8192, 20) if s.cuda else (4096, 3)
    device = "cuda" if s.cuda else "cpu"
    a = torch.randn(n, n, device=device, dtype=s.torch_dtype)
    b = torch.randn(n, n, device=device, dtype=s.torch_dtype)
    best = float("inf")
    a @ b  # warm-up
    for _ in range(reps):
        clock = Clock(s.cuda)
        clock.time("mm", torch.matmul, a, b)
        best = min(best, clock.seconds("mm"))
    return 2 * n**3 / best


def count_flops(fn) -> tuple[object, dict]:
    """Run ``fn`` under FlopCounterMode; FLOPs by component (text encoder, UNet, decoder)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # torch counts SDPA's CUDA kernels; on a CPU it runs this one, which needs the same formula.
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        out = fn()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." not in name}
    total = counts.pop("Global")
    text, unet = counts.get("CLIPTextModel", 0), counts.get("UNet2DConditionModel", 0)
    return out, {"text_encoder": text, "unet": unet, "decoder": total - text - unet, "total": total}


# --------------------------------------------------------------------------------------------
# 3. Rows: the baseline and synth's generator with switches
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    what: str
    switches: dict = field(default_factory=dict)  # on top of ALL_OFF
    batch: int = 1


def measure_baseline(s: Settings, models: dict, res: int, flops: dict) -> dict:
    """A plain diffusers pipeline, one prompt per call, PIL out, resized to 32 px with PIL; its
    warm-up counts the FLOPs of text encoder, UNet and VAE decoder into ``flops`` if still empty."""
    import torch
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    device = "cuda" if s.cuda else "cpu"
    clock = Clock(s.cuda)
    pipe = clock.time("load", AutoPipelineForText2Image.from_pretrained, models["model"], dtype=s.torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    for attr, obj, name in (("forward", pipe.text_encoder, "text_encoder"), ("forward", pipe.unet, "unet"), ("decode", pipe.vae, "decoder")):
        clock.wrap(obj, attr, name)

    def one(row):
        gen = torch.Generator(device).manual_seed(int(row["seed"]))
        image = pipe(row["prompt"], num_inference_steps=1, guidance_scale=0.0, height=res, width=res, generator=gen).images[0]
        return np.asarray(image), image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)

    with torch.inference_mode():
        if flops:
            clock.time("warmup", one, call_rows(1, -1)[0])
        else:
            _, counted = count_flops(lambda: clock.time("warmup", one, call_rows(1, -1)[0]))
            flops.update({"text_encoder": counted["text_encoder"], "unet": counted["unet"], "vae_decoder": counted["decoder"]})
        clock.reset()
        first = None
        for k in range(s.calls):
            full, _ = clock.time("call", one, call_rows(1, k)[0])
            first = full if first is None else first
    out = summarize(s, clock, s.calls, flops["unet"] + flops["vae_decoder"])
    return {**out, "first_image": first}


def measure_synth(s: Settings, models: dict, res: int, row: Row, flops: dict, reference) -> dict:
    """synth's generator with ``row.switches`` on (everything else off), ``row.batch`` rows per call."""
    import torch

    switches = {**ALL_OFF, **row.switches}
    if switches["decoder"]:
        switches["decoder"] = models["taesd"]
    cfg = GenerateConfig(model=models["model"], steps=1, guidance_scale=0.0, height=res, width=res, image_size=IMAGE_SIZE,
                         dtype=s.dtype, batch_size=row.batch, keep_full_resolution=True, **switches)  # fmt: skip
    clock = Clock(s.cuda)
    gen = clock.time("load", build_generator, cfg, CLASSES)
    pipe = gen.pipe
    clock.wrap(pipe.text_encoder, "forward", "text_encoder")
    clock.wrap(pipe.vae, "decode", "decoder")
    if not cfg.compile:  # a Python wrapper inside the compiled graph would break it
        clock.wrap(pipe.unet, "forward", "unet")

    def call(rows):
        return gen.generate([r["prompt"] for r in rows], [r["negative"] for r in rows], [r["seed"] for r in rows])

    with torch.inference_mode():
        if cfg.decoder and "tiny_decoder" not in flops:
            _, counted = count_flops(lambda: clock.time("warmup", call, call_rows(row.batch, -1)))
            flops["tiny_decoder"] = counted["decoder"] // row.batch
        else:
            clock.time("warmup", call, call_rows(row.batch, -1))
        clock.reset()
        first = None
        for k in range(s.calls):
            images = clock.time("call", call, call_rows(row.batch, k))
            first = images.full[0] if first is None else first
            assert images.small.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and images.small.std() > 0, "valid images"
    path_flops = flops["unet"] + (flops.get("tiny_decoder", 0) if cfg.decoder else flops["vae_decoder"])
    out = summarize(s, clock, row.batch * s.calls, path_flops)
    diff = np.abs(first.astype(np.int16) - reference.astype(np.int16))
    out.update(max_pixel_diff=int(diff.max()), pixels_differing=float((diff > 0).mean()))
    if gen.embeddings is not None:
        out["prompt_embeddings"] = {"encoded": gen.embeddings.encoded, "reused": gen.embeddings.reused}
    return out


def summarize(s: Settings, clock: Clock, images: int, path_flops: int) -> dict:
    """Rates of the measured calls; the UNet + decoder path's FLOP rate where its parts were timed."""
    seconds = clock.seconds("call")
    out = {
        "images": images,
        "images_per_second": images / seconds,
        "wall_images_per_second": images / clock.wall["call"],
        "cpu_seconds": clock.cpu["call"],
        "wall_seconds": clock.wall["call"],
        "load_seconds": clock.wall["load"],
        "warmup_wall_seconds": clock.wall["warmup"],
        "components_seconds_per_image": {k: clock.seconds(k) / images for k in ("text_encoder", "unet", "decoder") if clock.has(k)},
        "load_average": os.getloadavg(),
    }
    path = clock.seconds("unet") + clock.seconds("decoder") if clock.has("unet") else seconds  # compiled: whole calls
    out["path_flop_rate"] = path_flops * images / path
    return out


# --------------------------------------------------------------------------------------------
# 4. The Ray Data stage against the bare loop
# --------------------------------------------------------------------------------------------


def stage_config(s: Settings, models: dict, res: int, switches: dict, shard_size: int, shards: int):
    over = {"generate.model": models["model"], "generate.height": res, "generate.width": res, "generate.dtype": s.dtype,
            "generate.batch_size": s.batch, "generate.shard_size": shard_size, "generate.num_actors": 1,
            "prompts.per_class": shard_size * shards, "prompts.hostile_per_class": 0,
            # One prompt, as the loop's calls repeat theirs: the prompt cache is warm after the first shard.
            "prompts.classes": "[bird]", "prompts.techniques.vanilla": 1.0, "prompts.techniques.environment": 0,
            "prompts.techniques.domain": 0, "prompts.techniques.hard": 0, "prompts.vanilla_templates": "['a photo of a {cls}']"}  # fmt: skip
    over.update({f"generate.{k}": ("null" if v is None else v) for k, v in switches.items()})
    if not s.cuda:  # the actor gets the loop's threads: Ray sets its torch threads to its CPUs
        over["generate.cpus_per_actor"] = s.threads
        over["generate.num_gpus_per_actor"] = 0
    return load_config(REPO / "configs" / "base.yaml", [f"{k}={v}" for k, v in over.items()] + ["prompts.techniques.llm=0", "run=bench"])


def ray_stage(cfg, shards: int) -> dict:
    """Steady state of the Ray Data stage (generate + encode + write) into a temporary local root."""
    from synth.runtime import init_ray

    init_ray(cfg.ray)
    shard_list = shard_rows(build_prompt_table(cfg), cfg.generate.shard_size)[:shards]
    with tempfile.TemporaryDirectory() as tmp:
        start, stamps = time.perf_counter(), []
        maker = TextToImage(cfg.generate, list(cfg.prompts.classes))
        job = ImageJob("generate", "bench", shard_list, {}, cfg.generate.model, maker, cfg.generate)
        for row in run_ray_generation(Storage(tmp), job, list(enumerate(shard_list)), "0" * 64):  # no plan.json: a benchmark
            stamps.append((time.perf_counter(), int(row["images"])))
    stamps.sort()
    steady_images, steady_seconds = sum(n for _, n in stamps[1:]), stamps[-1][0] - stamps[0][0]
    return {
        "images": sum(n for _, n in stamps),
        "wall_seconds": stamps[-1][0] - start,
        "first_shard_seconds": stamps[0][0] - start,
        "steady_images": steady_images,
        "steady_seconds": steady_seconds,
        "images_per_second": steady_images / steady_seconds,
    }


# --------------------------------------------------------------------------------------------
# 5. One resolution: every row, then best through Ray Data
# --------------------------------------------------------------------------------------------


def study(s: Settings, models: dict, res: int) -> dict:
    flops: dict = {}
    result: dict = {"resolution": res, "rows": {}}
    say = lambda text: print(f"[bench {res}px] {text}", file=sys.stderr, flush=True)  # noqa: E731
    say("baseline: plain diffusers pipeline, one prompt per call")
    base = measure_baseline(s, models, res, flops)
    reference = base.pop("first_image")
    result["rows"]["baseline"] = {"what": "plain diffusers pipeline, one prompt per call, PIL resize", **base}
    gc.collect()

    defaults = {k: getattr(GenerateConfig(), k) for k in SWITCHES}  # synth's defaults: the switches that change no image
    rows = [
        Row("prompt_cache", "prompt embeddings cached per actor (warm)", {"prompt_cache": defaults["prompt_cache"] or 1024}),
        Row("fuse_qkv", "fused QKV projections (UNet and VAE)", {"fuse_qkv": True}),
        Row("attention=classic", "explicit softmax(QK^T)V instead of SDPA: what SDPA saves", {"attention": "classic"}),
        Row("channels_last", "NHWC convolutions (UNet and decoder)", {"channels_last": True}),
        Row("decoder=tiny", "tiny autoencoder (TAESD's architecture) instead of the VAE", {"decoder": "tiny"}),
        Row(f"batch_size={s.batch}", f"{s.batch} images per pipeline call", {}, s.batch),
    ]
    if res in s.compile_at:
        rows.append(Row("compile", "torch.compile of the UNet and the decoder", {"compile": True}))
    rows.append(Row("defaults", f"synth's defaults ({', '.join(f'{k}={v}' for k, v in defaults.items())}), batch {s.batch}", defaults, s.batch))
    for row in rows:
        say(f"{row.name}: {row.what}")
        result["rows"][row.name] = {"what": row.what, **measure_synth(s, models, res, row, flops, reference)}
        gc.collect()

    speedup = {name: r["images_per_second"] / base["images_per_second"] for name, r in result["rows"].items()}
    best = {**defaults, "decoder": "tiny", **{k: True for k in ROUNDING if speedup.get(k, 0) > 1.03}}
    best_row = Row("best", "defaults + tiny decoder" + "".join(f" + {k}" for k in ROUNDING if best[k]) + f", batch {s.batch}", best, s.batch)
    say(f"best: {best_row.what}")
    result["rows"]["best"] = {"what": best_row.what, **measure_synth(s, models, res, best_row, flops, reference)}
    result["best_switches"] = best
    gc.collect()
    say("baseline again: the drift of the machine over this resolution's rows")
    again = measure_baseline(s, models, res, flops)
    again.pop("first_image")
    result["rows"]["baseline again"] = {"what": "the baseline measured again, after the other rows", **again}
    gc.collect()

    say(f"best through the Ray Data stage: {s.ray_shards} shards of {s.batch * s.calls} images")
    stage = {**best, "decoder": models["taesd"]}
    cfg = stage_config(s, models, res, stage, s.batch * s.calls, s.ray_shards)
    staged = ray_stage(cfg, s.ray_shards)
    loop = result["rows"]["best"]
    staged["ray_over_loop_wall"] = staged["images_per_second"] / loop["wall_images_per_second"]
    result["ray_data"] = staged
    result["flops_per_image"] = flops
    result["speedup_vs_baseline"] = {name: r["images_per_second"] / base["images_per_second"] for name, r in result["rows"].items()}
    return result


# --------------------------------------------------------------------------------------------
# 6. Driver memory: the whole stage's driver at N and 4N images (no model: a test generator)
# --------------------------------------------------------------------------------------------


def driver_peak_rss(images: int) -> float:
    """Peak RSS (MiB) of a fresh driver process running the generate stage for ``images`` images."""
    cmd = [sys.executable, __file__, "--child-images", str(images)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["driver_peak_rss_mib"]


def child_driver(images: int) -> None:
    from synth.generate import run_generate

    with peak_rss() as peak, tempfile.TemporaryDirectory() as tmp:
        over = ["generate.generator=synth.testkit:ClassAwareTestGenerator", f"prompts.per_class={images // len(CLASSES)}",
                "prompts.hostile_per_class=0", "generate.shard_size=256", "generate.num_actors=2", "generate.num_gpus_per_actor=0",
                f"storage.root={tmp}", "run=bench"]  # fmt: skip
        run_generate(load_config(REPO / "configs" / "base.yaml", NO_LLM + over))
    print(json.dumps({"driver_peak_rss_mib": peak[0] / 2**20}))


# --------------------------------------------------------------------------------------------
# 7. Tables
# --------------------------------------------------------------------------------------------


def tables(result: dict) -> str:
    cuda = result["settings"]["cuda"]
    unit = "img/s" if cuda else f"img/CPU-s ({result['settings']['threads']} thread{'s' * (result['settings']['threads'] > 1)})"
    mm = max(result["matmul_flop_rate"])
    lines = [f"Attainable rate (matmul, {result['settings']['dtype']}): {mm / 1e9:,.1f} GFLOP/s (start {result['matmul_flop_rate'][0] / 1e9:,.1f}, "
             f"end {result['matmul_flop_rate'][-1] / 1e9:,.1f})", ""]  # fmt: skip
    for study_ in result["studies"]:
        f = study_["flops_per_image"]
        lines += [f"### {study_['resolution']} px", "",
                  f"FLOPs per image: text encoder {f['text_encoder'] / 1e12:.4g} T, UNet {f['unet'] / 1e12:.4g} T, "
                  f"VAE decoder {f['vae_decoder'] / 1e12:.4g} T, tiny decoder {f.get('tiny_decoder', 0) / 1e12:.4g} T.", "",
                  f"| row | what | {unit} | wall img/s | x baseline | UNet+decoder GFLOP/s | of matmul | first image vs baseline (max diff / pixels differing) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
        for name, r in study_["rows"].items():
            diff = f"{r['max_pixel_diff']} / {r['pixels_differing']:.4%}" if "max_pixel_diff" in r else "reference"
            lines.append(f"| {name} | {r['what']} | {r['images_per_second']:.4g} | {r['wall_images_per_second']:.4g} | "
                         f"{study_['speedup_vs_baseline'][name]:.2f} | {r['path_flop_rate'] / 1e9:,.1f}{'*' * ('unet' not in r['components_seconds_per_image'])} | "
                         f"{r['path_flop_rate'] / mm:.0%} | {diff} |")  # fmt: skip
        compile_row = study_["rows"].get("compile")
        if compile_row:
            lines.append("\n\\* the whole call's time: the compiled UNet is not timed apart.")
            lines.append(f"\nCompile (UNet + decoder, warm-up call minus a measured call): "
                         f"{compile_row['compile_seconds']:.0f} s wall, inductor cache {result['inductor_cache']}.")  # fmt: skip
        ray = study_["ray_data"]
        lines += ["", f"Ray Data stage (best): {ray['images_per_second']:.4g} img/s wall, steady ({ray['steady_images']} images in "
                  f"{ray['steady_seconds']:.1f} s after the first shard at {ray['first_shard_seconds']:.0f} s) = "
                  f"{ray['ray_over_loop_wall']:.2f} of the bare loop's {study_['rows']['best']['wall_images_per_second']:.4g} img/s wall.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd-turbo-random", choices=["sd-turbo-random", "tiny"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: 512 256 (tiny: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 on a CPU, 32 on a GPU")
    parser.add_argument("--calls", type=int, default=None, help="measured calls per row (default: 1 on a CPU, 8 on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    parser.add_argument("--compile-at", type=int, nargs="*", default=None, help="resolutions with a compile row (default: the last on a CPU, all on a GPU)")
    parser.add_argument("--ray-shards", type=int, default=None, help="shards through the Ray stage (default: 3 on a CPU, 8 on a GPU)")
    parser.add_argument("--model-cache", default=str(REPO / ".cache" / "bench"), help="where the random-weight models are built once")
    parser.add_argument("--driver-memory", action="store_true", help="only the driver's peak RSS at --memory-images and 4x that")
    parser.add_argument("--memory-images", type=int, default=9000)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bench_generate_<preset>_<cpu|gpu>.json)")
    parser.add_argument("--child-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_images is not None:
        return child_driver(args.child_images)
    results = REPO / "benchmarks" / "results"
    if args.driver_memory:
        n = args.memory_images
        rss = {str(n): driver_peak_rss(n), str(4 * n): driver_peak_rss(4 * n)}
        out = {"driver_peak_rss_mib": rss, "generator": "synth.testkit:ClassAwareTestGenerator", "shard_size": 256,
               "device": _device(), "versions": _versions(), "command": " ".join(["python"] + sys.argv)}  # fmt: skip
        path = Path(args.out or results / "bench_generate_driver_memory.json")
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return

    # Compile time is reported cold unless an earlier run left its inductor cache here.
    inductor = Path(args.model_cache) / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor))
    cache_state = "warm (an earlier run's)" if inductor.exists() and any(inductor.iterdir()) else "cold"
    s = settings(args)
    models = build_models(args.preset, Path(args.model_cache))
    start = time.perf_counter()
    result = {"preset": args.preset, "settings": s.__dict__, "inductor_cache": cache_state, "command": " ".join(["python"] + sys.argv),
              "device": _device(), "versions": _versions(), "load_average_at_start": os.getloadavg()}  # fmt: skip
    result["matmul_flop_rate"] = [matmul_rate(s)]
    result["studies"] = []
    for res in s.resolutions:
        study_ = study(s, models, res)
        if "compile" in study_["rows"]:
            r = study_["rows"]["compile"]
            r["compile_seconds"] = r["warmup_wall_seconds"] - r["wall_seconds"] / s.calls
        result["studies"].append(study_)
    result["matmul_flop_rate"].append(matmul_rate(s))
    result["wall_seconds"] = time.perf_counter() - start
    result["load_average_at_end"] = os.getloadavg()
    path = Path(args.out or results / f"bench_generate_{args.preset}_{'gpu' if s.cuda else 'cpu'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = tables(result)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\n{result['wall_seconds'] / 60:.1f} min; {path}", file=sys.stderr)


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

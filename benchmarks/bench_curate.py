"""Curate stage: CLIP scoring throughput, and the driver's memory at two image counts.

Measures:
- images/s of the curate scorer (:class:`synth.curate.ClipScorer` + :func:`synth.curate.score_images`:
  preprocessing to 224 px, the vision tower, the similarities and softmax) in a plain loop after
  one warm-up batch, with the **ViT-B/32 architecture** (``openai/clip-vit-base-patch32``'s
  config: 224 px, 32 px patches, 12 layers, width 768, 512-wide projections) built from its
  config with **random weights**: speed does not depend on weight values. On a CUDA GPU the
  scorer runs float16 on the device, as the stage does; unchanged command;
- the driver's peak RSS of the whole curate stage (Ray Data actor pool, score shards, the
  filter class by class, scores.parquet) over N and 4N stored 32 px images, each in a fresh
  process; the actors use the exact colour scorer (the driver never loads the model).

    python benchmarks/bench_curate.py                      # ~2-3 minutes on a 2-core CPU
    python benchmarks/bench_curate.py --images 4096 --batch-size 256   # on a GPU
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rss import peak_rss  # noqa: E402  (benchmarks/rss.py, beside this script)
from synth.config import load_config  # noqa: E402
from synth.storage import Storage  # noqa: E402


def build_vit_b32_random(folder: Path) -> Path:
    """CLIP ViT-B/32's architecture from its config, random weights, saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from synth.testkit import _clip_text_config, build_tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer(folder / "tokenizer")  # text runs once per actor: its vocabulary is irrelevant
    text = _clip_text_config(tokenizer)  # CLIP's text tower sizes (512 wide, 12 layers)
    vision = CLIPVisionConfig(image_size=224, patch_size=32)  # ViT-B/32: 768 wide, 12 layers
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)  # 224 px, CLIP's mean/std
    out = folder / "clip-vit-b32-random"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def throughput(args, folder: Path) -> dict:
    from synth.config import CurateConfig
    from synth.curate import ClipScorer, score_images
    from synth.testkit import class_pattern_image

    model = build_vit_b32_random(folder)
    start = time.perf_counter()
    scorer = ClipScorer(CurateConfig(model=str(model)), [f"class {k}" for k in range(10)])
    load_seconds = time.perf_counter() - start
    images = [class_pattern_image(k % 10, k, 32) for k in range(args.images)]
    labels = [k % 10 for k in range(args.images)]
    score_images(scorer, images[: args.batch_size], labels[: args.batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, args.images, args.batch_size):
        score_images(scorer, images[i : i + args.batch_size], labels[i : i + args.batch_size])
    seconds = time.perf_counter() - start
    import torch

    return {
        "model": "CLIP ViT-B/32 architecture, random weights (speed does not depend on weights)",
        "images": args.images,
        "batch_size": args.batch_size,
        "device": scorer.device,
        "dtype": str(scorer.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "model_load_seconds": round(load_seconds, 2),
        "seconds": round(seconds, 2),
        "images_per_second": round(args.images / seconds, 1),
    }


def write_fake_generate(storage: Storage, run: str, images: int, shard_size: int, classes: list[str]) -> None:
    """A finished generate stage of ``images`` 32 px class-pattern images: shards + manifest, no Ray."""
    import pyarrow as pa

    from synth.config import class_slug
    from synth.images import encode_png
    from synth.shards import MANIFEST_COLUMNS, META_PLAN, shard_table
    from synth.storage import Layout, parquet_bytes
    from synth.testkit import class_pattern_image

    layout, plan = Layout(run), "b" * 64
    per_class = -(-images // len(classes))
    rows = [{"id": f"{class_slug(c)}-{i:06d}", "label": y, "class_name": c, "prompt": f"a photo of a {c}", "negative": "",
             "seed": 1000 * y + i, "technique": "vanilla"} for y, c in enumerate(classes) for i in range(per_class)][:images]  # fmt: skip
    rows.sort(key=lambda r: r["id"])
    parts = []
    for k in range(0, len(rows), shard_size):
        chunk = rows[k : k + shard_size]
        pngs = [encode_png(class_pattern_image(r["label"], r["seed"], 32)) for r in chunk]
        table = shard_table(chunk, pngs, k // shard_size, "bench", (32, 32), plan)
        storage.write_bytes(layout.shard("generate", k // shard_size), parquet_bytes(table))
        parts.append(table.select(MANIFEST_COLUMNS))
    manifest = pa.concat_tables(parts).replace_schema_metadata({META_PLAN: plan.encode()})
    storage.write_parquet(layout.manifest("generate"), manifest)


def child(args) -> None:
    """Run the curate stage once over a stored run (made by the parent) and print the driver's peak RSS."""
    from synth.curate import run_curate

    cfg = load_config(REPO / "configs" / "base.yaml", [f"storage.root={args.child_root}", "run=bench",
                      "curate.scorer=synth.testkit:ColourTestScorer", f"curate.shard_size={args.shard_size}",
                      "curate.num_gpus_per_actor=0", "ray.local_num_cpus=2"])  # fmt: skip
    with peak_rss() as peak:
        summary = run_curate(cfg)
    print(json.dumps({"driver_peak_rss_mib": round(peak[0] / 2**20, 1), "images": summary["scored"],
                      "scoring_wall_seconds": summary["scoring_wall_seconds"]}))  # fmt: skip


def driver_memory(args, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        classes = load_config(REPO / "configs" / "base.yaml").prompts.classes
        write_fake_generate(Storage(tmp), "bench", images, 256, list(classes))
        cmd = [sys.executable, __file__, "--child-root", tmp, "--shard-size", str(args.shard_size)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images scored for the throughput figure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory-images", type=int, default=2000, help="N: the driver's memory is measured at N and 4N")
    parser.add_argument("--shard-size", type=int, default=500, help="curate.shard_size for the memory runs")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_curate.json"))
    parser.add_argument("--child-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_root:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = {"throughput": throughput(args, Path(tmp))}
    print(json.dumps(result["throughput"]), flush=True)
    if not args.skip_memory:
        result["driver_peak_rss_mib"] = {str(n): driver_memory(args, n) for n in (args.memory_images, 4 * args.memory_images)}
    result["machine"] = _device()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"


if __name__ == "__main__":
    main()

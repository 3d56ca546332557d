"""Small stand-ins for what cannot be downloaded here: random-weight models and class-aware images.

- :func:`build_tiny_random_sd_pipeline` writes a real diffusers Stable Diffusion pipeline (UNet,
  VAE, CLIP text encoder and tokenizer, scheduler) built from tiny configs with **random weights**
  to a folder with ``save_pretrained``. It exercises exactly the code path of a real model
  (``from_pretrained``, per-image generators, dtype, resize), and renders noise.
- :func:`class_pattern_image` draws a 32x32-ish image whose colours and stripes depend on the
  class, with seed-dependent jitter and noise. :class:`ClassAwareTestGenerator` (selected with
  ``generate.generator=synth.testkit:ClassAwareTestGenerator``) and the real-data fixtures use it,
  so a classifier trained on one and tested on the other is far above chance only if labels and
  ids survived the whole chain.

- :func:`build_tiny_random_sd_inpaint_pipeline`, :func:`build_tiny_random_kandinsky` (a prior +
  decoder pair) and :func:`build_tiny_random_unclip` do the same for the image-conditioned and
  prior-based pipelines of :mod:`synth.diffusion`, from the configs of diffusers' own fast tests.

- :func:`build_tiny_random_clip` writes a random-weight CLIP for the curate stage, and
  :class:`ColourTestScorer` scores images exactly by their mean colour.
- :func:`build_tiny_random_llm` writes a tiny random-weight GPT-2 and a character-level
  tokenizer (with a chat template) for :mod:`synth.llm`: it writes garbage, by design.

Usage: ``python -m synth.testkit tiny-sd <folder>`` (or ``tiny-sd-inpaint``, ``tiny-kandinsky``,
``tiny-unclip``, ``tiny-clip``, ``tiny-llm``) or ``cifar10-fixture <folder>``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from synth.config import GenerateConfig
    from synth.images import GeneratedImages

# -- tiny random Stable Diffusion ------------------------------------------------------------


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, alone and as word ends: every string tokenizes, no <unk>."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _clip_text_config(tokenizer, **sizes):
    """A CLIP text config for ``tokenizer`` (its vocabulary, special tokens, 77 positions) with ``sizes``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def _save_random_sd_pipeline(out: Path, unet, vae, text_config: dict, dtype=None, pipeline_class=None) -> Path:
    """Assemble a Stable Diffusion pipeline around ``unet`` and ``vae`` (SD-Turbo's scheduler,
    the byte-level tokenizer, a random CLIP text encoder from ``text_config``) and save it.

    ``pipeline_class`` (default ``StableDiffusionPipeline``) is what ``model_index.json`` records,
    e.g. ``StableDiffusionInpaintPipeline`` around a 9-channel UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_clip_tokenizer(Path(tmp))
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, **text_config))
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1
        )
        pipe = (pipeline_class or StableDiffusionPipeline)(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        if dtype is not None:
            pipe.to(dtype)
        pipe.save_pretrained(out)
    return out


def _tiny_sd_unet_and_vae(in_channels: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    # Four VAE blocks give the real model's 8x downsampling: 64 px images use 8x8 latents.
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )
    return unet, vae


_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def build_tiny_random_sd_pipeline(out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight Stable Diffusion pipeline (~1 MB) to ``out``; returns the folder."""
    import torch

    torch.manual_seed(seed)
    unet, vae = _tiny_sd_unet_and_vae(in_channels=4)
    return _save_random_sd_pipeline(Path(out), unet, vae, _TINY_TEXT)


def build_full_size_random_sd_pipeline(out: str | Path, seed: int = 0) -> Path:
    """Write SD-Turbo's architecture (SD 2.1: UNet, VAE, OpenCLIP ViT-H text encoder) with random weights.

    For throughput benchmarks only: FLOPs and memory match the real model, the pictures do not.
    Saved in float16 (~2.6 GB). The tokenizer is the tiny byte-level one; prompts still pad to 77.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=768,
    )
    text = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
            "hidden_act": "gelu", "projection_dim": 512}  # fmt: skip
    return _save_random_sd_pipeline(Path(out), unet, vae, text, dtype=torch.float16)


def build_tiny_random_autoencoder_tiny(out: str | Path, seed: int = 0, full_size: bool = False) -> Path:
    """Write a random-weight tiny autoencoder (``AutoencoderTiny``, TAESD's class) for SD's 4-channel
    latents, for ``generate.decoder``; returns the folder. 8 channels per block for the tiny SD
    pipeline, or with ``full_size`` TAESD's own architecture (``AutoencoderTiny()``'s defaults:
    64 channels, ~1.2M parameters), for throughput benchmarks."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    blocks = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))  # fmt: skip
    AutoencoderTiny(latent_channels=4, **({} if full_size else blocks)).save_pretrained(out)
    return Path(out)


# -- tiny random image-conditioned models: SD inpainting, Kandinsky 2.2, UnCLIP ---------------
# Architectures as in diffusers' own fast tests (tests/pipelines/...), random weights, seeded;
# each renders 64x64 images on a CPU in well under a second per step.

_EMBED = 32  # CLIP embedding width: text and image projections, the prior's and the decoders' embedding


def build_tiny_random_sd_inpaint_pipeline(out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight Stable Diffusion **inpainting** pipeline to ``out``: the tiny SD model
    with a 9-channel UNet (noisy latents 4 + mask 1 + masked-image latents 4), as
    ``stabilityai/stable-diffusion-2-inpainting`` has. Returns the folder."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    torch.manual_seed(seed)
    unet, vae = _tiny_sd_unet_and_vae(in_channels=9)
    return _save_random_sd_pipeline(Path(out), unet, vae, _TINY_TEXT, pipeline_class=StableDiffusionInpaintPipeline)


def _tiny_clip_text_encoder(tokenizer):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        _clip_text_config(tokenizer, hidden_size=_EMBED, projection_dim=_EMBED, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2)
    )  # fmt: skip


def _tiny_prior_transformer():
    import torch
    from diffusers import PriorTransformer

    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=_EMBED, num_layers=1)
    # clip_std starts at 0, which makes post_process_latents return 0 for every prompt and seed.
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    return prior


def build_tiny_random_kandinsky(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a random-weight Kandinsky 2.2 pair: ``<out_dir>/prior`` (KandinskyV22PriorPipeline: text ->
    CLIP image embedding; its image encoder embeds images for variations and interpolation) and
    ``<out_dir>/decoder`` (KandinskyV22Pipeline: image embedding -> image). Returns (prior, decoder).

    The image encoder projects to the decoder's image-embedding width (32), so an image's embedding
    decodes; the decoder renders 64x64 (the MoVQ halves each side: 32x32 latents).
    """
    import torch
    from diffusers import (
        DDPMScheduler,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_clip_tokenizer(Path(tmp))
        text_encoder = _tiny_clip_text_encoder(tokenizer)
        prior = _tiny_prior_transformer()
        vision = CLIPVisionConfig(
            hidden_size=_EMBED, projection_dim=_EMBED, image_size=32, patch_size=8, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, num_channels=3,
        )  # fmt: skip
        image_encoder = CLIPVisionModelWithProjection(vision)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True, do_resize=True,
            do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711], resample=3,
        )  # fmt: skip
        prior_scheduler = UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
            clip_sample=True, clip_sample_range=10.0,
        )  # fmt: skip
        prior_pipe = KandinskyV22PriorPipeline(
            prior=prior, image_encoder=image_encoder, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=prior_scheduler, image_processor=image_processor,
        )  # fmt: skip
        prior_pipe.save_pretrained(out_dir / "prior")

    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and variance, as the real decoder predicts
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=_EMBED,  # the image embedding's width: must equal the image encoder's projection
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], in_channels=3, out_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12,
        vq_embed_dim=4,
    )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, prediction_type="epsilon", steps_offset=1,
    )  # fmt: skip
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(out_dir / "decoder")
    return out_dir / "prior", out_dir / "decoder"


def build_tiny_random_unclip(out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight UnCLIPPipeline (Karlo's architecture: prior, 32 px decoder, two 64 px
    super-resolution UNets) to ``out``; returns the folder. Renders 64x64 whatever is asked."""
    import torch
    from diffusers import UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    out = Path(out)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_clip_tokenizer(Path(tmp))
        text_encoder = _tiny_clip_text_encoder(tokenizer)
        prior = _tiny_prior_transformer()
        text_proj = UnCLIPTextProjModel(clip_embeddings_dim=_EMBED, time_embed_dim=128, cross_attention_dim=100)
        decoder = UNet2DConditionModel(
            sample_size=32,
            in_channels=3,
            out_channels=6,  # mean and variance
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=100,
            attention_head_dim=4,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
        )
        super_res = {
            "sample_size": 64, "layers_per_block": 1, "block_out_channels": (16, 32), "norm_num_groups": 8,
            "in_channels": 6, "out_channels": 3,
            "down_block_types": ("ResnetDownsampleBlock2D",) * 2, "up_block_types": ("ResnetUpsampleBlock2D",) * 2,
        }  # fmt: skip
        super_res_first, super_res_last = UNet2DModel(**super_res), UNet2DModel(**super_res)
        pipe = UnCLIPPipeline(
            prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder, tokenizer=tokenizer,
            super_res_first=super_res_first, super_res_last=super_res_last,
            prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                            num_train_timesteps=1000, clip_sample_range=5.0),
            decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                              num_train_timesteps=1000),
            super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                                num_train_timesteps=1000),
        )  # fmt: skip
        pipe.save_pretrained(out)
    return out


# -- class-aware images ----------------------------------------------------------------------

# Distinct, saturated colours; flips and crops keep both the colour and the stripe direction.
_PALETTE = np.array(
    [
        [230, 60, 50],
        [50, 170, 60],
        [50, 90, 220],
        [240, 200, 40],
        [170, 60, 200],
        [40, 200, 210],
        [240, 130, 30],
        [120, 120, 120],
        [250, 250, 250],
        [20, 20, 20],
    ],
    dtype=np.float32,
)


def class_pattern_image(label: int, seed: int, size: int = 32) -> np.ndarray:
    """A (size, size, 3) uint8 image whose colour and stripe orientation encode ``label``.

    Classes beyond the palette cycle colours and change stripe period, so any class count works.
    """
    rng = np.random.default_rng(seed)
    colour = _PALETTE[label % len(_PALETTE)]
    period = 4 + 2 * (label // len(_PALETTE))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coord = yy if label % 2 == 0 else xx  # horizontal stripes for even labels, vertical for odd
    phase = rng.uniform(0, period)
    stripes = (np.sin(2 * np.pi * (coord + phase) / period) > 0).astype(np.float32)[..., None]
    brightness = rng.uniform(0.75, 1.0)
    img = colour * brightness * (0.55 + 0.45 * stripes)
    img += rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def find_class(prompt: str, classes: list[str]) -> int:
    """The label of the class a prompt names; the longest name wins when several match."""
    text = f" {prompt.lower()} "
    best, best_len = -1, -1
    for label, name in enumerate(classes):
        needle = name.lower()
        if needle in text and len(needle) > best_len:
            best, best_len = label, len(needle)
    if best < 0:
        raise ValueError(f"prompt {prompt!r} names none of the classes {classes}")
    return best


class ClassAwareTestGenerator:
    """A generate-stage generator that draws the class its prompt names (:func:`class_pattern_image`).

    ``generate.generator=synth.testkit:ClassAwareTestGenerator``; it loads no model. It proves
    labels and ids survive prompts -> generate -> dataset -> train, because a prompt/label mix-up
    anywhere makes the trained classifier fail.
    """

    needs_model = False

    @classmethod
    def model_name(cls, cfg: GenerateConfig) -> str:
        return cfg.generator  # no model: the plan and manifest record the generator as given

    def __init__(self, cfg: GenerateConfig, classes: Sequence[str]):
        self.cfg, self.classes = cfg, list(classes)

    def generate(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int], guidance_scales=None) -> GeneratedImages:
        """``guidance_scales`` is accepted and ignored: a class pattern has no guidance to scale."""
        from synth.images import GeneratedImages

        labels = [find_class(p, self.classes) for p in prompts]
        small = np.stack([class_pattern_image(y, int(s), self.cfg.image_size) for y, s in zip(labels, seeds)])
        full = None
        if self.cfg.keep_full_resolution:
            full = np.stack([class_pattern_image(y, int(s), self.cfg.height) for y, s in zip(labels, seeds)])
        return GeneratedImages(small=small, full=full)


class SlowClassAwareTestGenerator(ClassAwareTestGenerator):
    """:class:`ClassAwareTestGenerator` at a model's pace (``seconds_per_image`` of sleep), so
    fault tests can kill an actor, cut the storage or race a second driver while shards land."""

    seconds_per_image = 0.02

    def generate(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int], guidance_scales=None) -> GeneratedImages:
        import time

        time.sleep(self.seconds_per_image * len(prompts))
        return super().generate(prompts, negatives, seeds, guidance_scales)


class ClassAwareTestDeriver:
    """A derive-stage generator whose children keep what their parents look like.

    ``derive.generator=synth.testkit:ClassAwareTestDeriver``; it loads no model. A variation is
    its parent with seeded noise, a fusion the weighted mean of its two parents, an inpainting
    edit the parent with the masked part redrawn as the pattern of the class its prompt names.
    A child filed under the wrong parent, class or label is an image of another class, so a
    classifier trained on children and tested on real images fails if lineage or labels break.
    """

    needs_model = False

    @classmethod
    def model_name(cls, cfg) -> str:
        return cfg.generator

    def __init__(self, cfg, gen: GenerateConfig, classes: Sequence[str]):
        self.gen, self.classes = gen, list(classes)

    def derive(self, rows: Sequence[dict], parents) -> GeneratedImages:
        from PIL import Image

        from synth.images import GeneratedImages, inpaint_mask

        size = self.gen.image_size

        def at_size(img: np.ndarray) -> np.ndarray:
            if img.shape[:2] == (size, size):
                return img.astype(np.float32)
            return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)

        out = []
        for row in rows:
            rng = np.random.default_rng(int(row["seed"]))
            first = at_size(parents[row["parents"][0]])
            if row["technique"] == "fusion":
                w = float(row["params"]["weight"])
                img = w * first + (1 - w) * at_size(parents[row["parents"][1]])
            elif row["technique"] == "inpainting":
                mask = inpaint_mask(row["params"]["mask"], size, size, int(row["seed"]))[..., None]
                drawn = class_pattern_image(find_class(row["prompt"], self.classes), int(row["seed"]), size)
                img = np.where(mask, drawn.astype(np.float32), first)
            else:
                img = first + rng.normal(0.0, 8.0, size=first.shape)
            out.append(np.clip(img, 0, 255).astype(np.uint8))
        return GeneratedImages(small=np.stack(out))


class SlowClassAwareTestDeriver(ClassAwareTestDeriver):
    """:class:`ClassAwareTestDeriver` at a model's pace (``seconds_per_image`` of sleep), for fault tests."""

    seconds_per_image = 0.05

    def derive(self, rows: Sequence[dict], parents) -> GeneratedImages:
        import time

        time.sleep(self.seconds_per_image * len(rows))
        return super().derive(rows, parents)


# -- real-data fixtures ----------------------------------------------------------------------

# CIFAR-10's label names in its own label order (batches.meta).
CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FILES = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def _fixture_seed(seed: int, split: str, index: int) -> int:
    # Distinct from each other and, in practice, from the generate stage's 63-bit hashed seeds.
    return seed * 1_000_003 + (0 if split == "train" else 500_000) + index


def write_cifar10_fixture(
    folder: str | Path,
    per_class_train: int,
    per_class_test: int,
    classes: list[str] | None = None,
    archive: bool = False,
    seed: int = 0,
) -> Path:
    """Write a small CIFAR-10 in the official python format; returns where it is.

    The files are those of ``cifar-10-python.tar.gz`` (``batches.meta``, ``data_batch_1..5``,
    ``test_batch``: pickled dicts with bytes keys, ``b"data"`` rows of 3072 uint8 in CHW order),
    holding ``per_class_*`` images of each of the 10 CIFAR classes in shuffled order. An image of
    a class at position ``i`` in ``classes`` (default: the six animal classes of the default
    config, so the fixture matches ``prompts.classes`` unless that is changed) is
    ``class_pattern_image(i, ...)``, the pattern :class:`ClassAwareTestGenerator` draws for
    label ``i``; CIFAR classes not in ``classes`` get the following labels' patterns.

    Returns ``<folder>/cifar-10-batches-py``, or ``<folder>/cifar-10-python.tar.gz`` when
    ``archive`` is true (then no extracted folder is written).
    """
    import io
    import pickle
    import tarfile

    folder = Path(folder)
    from synth.config import CIFAR10_ANIMALS

    classes = list(classes) if classes is not None else list(CIFAR10_ANIMALS)
    unknown = [c for c in classes if c not in CIFAR10_LABEL_NAMES]
    if unknown:
        raise ValueError(f"classes {unknown} are not CIFAR-10 classes ({', '.join(CIFAR10_LABEL_NAMES)})")
    pattern = {name: i for i, name in enumerate(classes + [n for n in CIFAR10_LABEL_NAMES if n not in classes])}
    rng = np.random.default_rng(seed)

    def split_arrays(per_class: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(CIFAR10_LABEL_NAMES)), per_class)
        rng.shuffle(labels)  # CIFAR's batches interleave classes
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        for i, cifar_label in enumerate(labels):
            img = class_pattern_image(pattern[CIFAR10_LABEL_NAMES[cifar_label]], _fixture_seed(seed, split, i), 32)
            data[i] = img.transpose(2, 0, 1).reshape(-1)  # (32, 32, 3) HWC -> 3072 CHW, as CIFAR stores it
        return data, labels

    def batch(label: str, data: np.ndarray, labels: np.ndarray, first: int) -> bytes:
        obj = {
            b"batch_label": label.encode(),
            b"labels": [int(x) for x in labels],
            b"data": data,
            b"filenames": [f"fixture_{first + i:06d}.png".encode() for i in range(len(labels))],
        }
        return pickle.dumps(obj, protocol=2)

    train_data, train_labels = split_arrays(per_class_train, "train")
    test_data, test_labels = split_arrays(per_class_test, "test")
    parts = np.array_split(np.arange(len(train_labels)), 5)
    files = {
        "batches.meta": pickle.dumps(
            {
                b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES],
                b"num_cases_per_batch": len(parts[0]),
                b"num_vis": 3072,
            },
            protocol=2,
        )
    }
    for i, idx in enumerate(parts, start=1):
        first = int(idx[0]) if len(idx) else 0
        files[f"data_batch_{i}"] = batch(f"training batch {i} of 5", train_data[idx], train_labels[idx], first)
    files["test_batch"] = batch("testing batch 1 of 1", test_data, test_labels, 0)

    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        out = folder / "cifar-10-python.tar.gz"
        with tarfile.open(out, "w:gz") as tar:
            for name in CIFAR10_FILES:
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
        return out
    out = folder / "cifar-10-batches-py"
    out.mkdir(exist_ok=True)
    for name in CIFAR10_FILES:
        (out / name).write_bytes(files[name])
    return out


def write_image_folder_fixture(
    folder: str | Path,
    classes: list[str],
    per_class: int,
    splits: tuple[str, ...] = ("train", "test"),
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``<folder>/<split>/<class>/<class>-NNNN.png`` drawn with :func:`class_pattern_image`.

    The image of a class at position ``i`` in ``classes`` uses label ``i``'s pattern; returns ``folder``.
    """
    from PIL import Image

    folder = Path(folder)
    for split in splits:
        for label, name in enumerate(classes):
            class_dir = folder / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = class_pattern_image(label, _fixture_seed(seed, split, label * 100_000 + i), size)
                Image.fromarray(img).save(class_dir / f"{name}-{i:04d}.png")
    return folder


def write_dataset_split(
    storage,
    run: str,
    domain: str,
    split: str,
    images: np.ndarray,
    labels,
    classes: list[str],
    ids: list[str] | None = None,
    source: str = "testkit",
) -> str:
    """Write one split in the dataset stage's own format (its ``SCHEMA``, metadata and sort order).

    ``images``: (N, S, S, 3) uint8; ``labels``: N ints indexing ``classes``; ids default to
    ``<domain>-<split>-<class>-<n>``. Goes through :func:`synth.dataset.build_table`, so a test
    table can never drift from what the dataset stage writes. Returns the key written.
    """
    from synth.dataset import Item, build_table
    from synth.storage import Layout

    labels = [int(y) for y in labels]
    if ids is None:
        seen: dict[int, int] = {}
        ids = []
        for y in labels:
            ids.append(f"{domain}-{split}-{classes[y]}-{seen.get(y, 0):05d}")
            seen[y] = seen.get(y, 0) + 1
    items = [
        Item(id=i, label=y, class_name=classes[y], source=source, pixels=np.ascontiguousarray(img))
        for i, y, img in zip(ids, labels, images)
    ]
    table, skipped = build_table(items, domain, int(images.shape[1]), classes)
    assert skipped == 0, "every fixture image is decodable"
    key = Layout(run).dataset_split(domain, split)
    storage.write_parquet(key, table)
    return key


def write_class_aware_dataset(
    storage, run: str, classes: list[str], per_class: dict[str, int], domains=("real", "synthetic"), size: int = 32
) -> None:
    """Every split of ``domains`` with ``per_class[split]`` class-pattern images per class (seeds distinct)."""
    for d, domain in enumerate(domains):
        for s, (split, n) in enumerate(per_class.items()):
            rows = [(label, i) for label in range(len(classes)) for i in range(n)]
            images = np.stack(
                [class_pattern_image(y, 100_000 * d + 10_000 * s + 100 * y + i, size) for y, i in rows]
            )
            write_dataset_split(storage, run, domain, split, images, [y for y, _ in rows], classes)


# -- tiny random CLIP and a deterministic scorer for the curate stage ---------------------------


def build_tiny_random_clip(out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight CLIP (``CLIPModel`` + ``CLIPProcessor``: 32x32 images, 16-wide
    projections, the tiny byte-level tokenizer) to ``out`` with ``save_pretrained``.

    It loads and runs exactly like ``openai/clip-vit-base-patch32`` (``curate.model=<out>``);
    its scores are noise.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    out = Path(out)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_clip_tokenizer(Path(tmp))
        text = _clip_text_config(tokenizer, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
        vision = CLIPVisionConfig(
            hidden_size=32, image_size=32, patch_size=8, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2
        )
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer,
        )
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


class ColourTestScorer:
    """A curate-stage scorer with exact, predictable scores: ``curate.scorer=synth.testkit:ColourTestScorer``.

    An image's embedding is its mean colour, centred on grey and L2-normalised (3 numbers); a
    class's text embedding is its :func:`class_pattern_image` palette colour, treated the same
    way. So a class-pattern image is most similar to its own class, and two images of one class
    are near-duplicates. It loads no model.
    """

    needs_model = False
    logit_scale = 10.0

    @classmethod
    def model_name(cls, cfg) -> str:
        return cfg.scorer

    def __init__(self, cfg, classes: Sequence[str]):
        self.text = _unit(np.stack([_PALETTE[k % len(_PALETTE)] for k in range(len(classes))]) - 127.5)  # (K, 3)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        means = np.stack([img.reshape(-1, 3).mean(axis=0) for img in images]) - 127.5  # (B, 3)
        return _unit(means).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

def tag_dataset_split(storage, run: str, domain: str, split: str, techniques, accepted) -> None:
    """Set a stored split's ``technique`` and ``accepted`` columns (issue 12's), row by row in its stored (id) order.

    ``techniques``: N strings; ``accepted``: N of True / False / None. Replaces the columns when
    the dataset stage already wrote them, so a fixture can state exactly what curate decided.
    """
    import pyarrow as pa

    from synth.storage import Layout

    key = Layout(run).dataset_split(domain, split)
    table = storage.read_parquet(key)
    for name, values, kind in (("technique", list(techniques), pa.string()), ("accepted", list(accepted), pa.bool_())):
        assert len(values) == table.num_rows, (name, len(values), table.num_rows)
        column = pa.array(values, type=kind)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    storage.write_parquet(key, table)


# -- tiny random causal language model ------------------------------------------------------

# Single characters only: whatever the random model samples decodes to one-letter "words" and
# symbols, so no line can pass synth.llm's rules (the garbage path, deterministically).
_TINY_LLM_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?-'\"()[]{}#$%&*+/<=>@^_|~")
TINY_LLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_random_llm(path, chat_template: bool = True) -> Path:
    """A tiny GPT-2 causal LM with **random weights** and a character-level tokenizer, saved with
    ``save_pretrained`` to ``path`` (no downloads). It returns garbage by design."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials + _TINY_LLM_CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character its own token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=specials[4:],
    )  # fmt: skip
    if chat_template:
        tokenizer.chat_template = TINY_LLM_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=256, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


USAGE = """usage:
  python -m synth.testkit tiny-sd <folder>                     random-weight tiny Stable Diffusion pipeline
  python -m synth.testkit tiny-sd-inpaint <folder>             ... its inpainting variant (9-channel UNet)
  python -m synth.testkit tiny-taesd <folder>                  ... a tiny autoencoder for its latents (generate.decoder)
  python -m synth.testkit tiny-kandinsky <folder>              ... Kandinsky 2.2 prior + decoder (<folder>/prior, <folder>/decoder)
  python -m synth.testkit tiny-unclip <folder>                 ... UnCLIP (Karlo's architecture)
  python -m synth.testkit tiny-clip <folder>                   random-weight tiny CLIP (model + processor) for curate
  python -m synth.testkit tiny-llm <folder>                    random-weight tiny causal language model (GPT-2) and tokenizer
  python -m synth.testkit cifar10-fixture <folder> [TRAIN TEST] class-aware CIFAR-10 python-format fixture
  python -m synth.testkit photo-folder <folder> CLASS [CLASS ...]  class-aware stand-in photos: <folder>/{train,test}/<class>/
"""


# The `tiny-<model> <folder>` commands: the builder and what the line it prints says was written.
BUILDERS = {
    "tiny-sd": (build_tiny_random_sd_pipeline, "tiny random-weight Stable Diffusion pipeline"),
    "tiny-sd-inpaint": (build_tiny_random_sd_inpaint_pipeline, "tiny random-weight Stable Diffusion inpainting pipeline"),
    "tiny-taesd": (build_tiny_random_autoencoder_tiny, "tiny random-weight tiny autoencoder (AutoencoderTiny)"),
    "tiny-unclip": (build_tiny_random_unclip, "tiny random-weight UnCLIP pipeline"),
    "tiny-clip": (build_tiny_random_clip, "tiny random-weight CLIP"),
    "tiny-llm": (build_tiny_random_llm, "tiny random-weight causal language model"),
}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] in BUILDERS:
        build, what = BUILDERS[argv[0]]
        folder = build(argv[1])
        print(f"{what} written to {folder}")
        return 0
    if len(argv) == 2 and argv[0] == "tiny-kandinsky":
        prior, decoder = build_tiny_random_kandinsky(argv[1])
        print(f"tiny random-weight Kandinsky 2.2 prior written to {prior}, its decoder to {decoder}")
        return 0
    if len(argv) >= 3 and argv[0] == "photo-folder":
        folder = write_image_folder_fixture(argv[1], argv[2:], per_class=6, splits=("train",), size=64)
        write_image_folder_fixture(argv[1], argv[2:], per_class=4, splits=("test",), size=64, seed=1)
        print(f"class-aware stand-in photos (6 train / 4 test per class of {', '.join(argv[2:])}) written to {folder}")
        return 0
    if len(argv) in (2, 4) and argv[0] == "cifar10-fixture":
        train, test = (int(argv[2]), int(argv[3])) if len(argv) == 4 else (40, 10)
        folder = write_cifar10_fixture(argv[1], per_class_train=train, per_class_test=test)
        print(f"class-aware CIFAR-10 fixture ({train} train / {test} test per class) written to {folder}")
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

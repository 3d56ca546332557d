"""Diffusers models: text-to-image generators and image-conditioned derivers.

- :class:`DiffusersGenerator` (the generate stage): a text-to-image pipeline from
  ``generate.model``: the Stable Diffusion family, UnCLIP (Karlo), or, with ``generate.prior``, a
  prior + decoder pair (Kandinsky 2.2: text -> CLIP image embedding -> image).
- :class:`DiffusersDeriver` (the derive stage): children of parent images: image-to-image
  variations, embedding variations and two-parent fusion (Kandinsky 2.2's image encoder and
  decoder), and inpainting.
- :func:`check_models`: on the driver before Ray starts, refuses model combinations that cannot
  work (a prior without a decoder, img2img with a model that has no image-to-image pipeline, ...),
  reading only each model's ``model_index.json``.

Every image is a function of its own row (prompt, negative, seed, parents) only, never of its
batch: each image gets its own ``torch.Generator`` seeded by its seed, so a retried shard rewrites
the same images. Imports only synth.config and synth.images; torch and diffusers load inside
functions, so the driver imports this module cheaply.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping, Optional, Sequence

import numpy as np

from synth.config import DERIVE_TECHNIQUES, Config, ConfigError, DeriveConfig, GenerateConfig
from synth.images import GeneratedImages, inpaint_mask

if TYPE_CHECKING:
    from PIL import Image

# model_index.json class names of the pipelines that need special handling.
PRIOR_CLASSES = ("KandinskyV22PriorPipeline",)
DECODER_CLASSES = ("KandinskyV22Pipeline",)
UNCLIP_CLASSES = ("UnCLIPPipeline",)
KANDINSKY_PRIOR_EXAMPLE = "kandinsky-community/kandinsky-2-2-prior"
KANDINSKY_DECODER_EXAMPLE = "kandinsky-community/kandinsky-2-2-decoder"
TINY_DECODER_CLASS = "AutoencoderTiny"  # generate.decoder: TAESD's class in diffusers
# UnCLIPScheduler (the Kandinsky 2.2 prior's and UnCLIP's) divides by steps - 1: it needs two.
MIN_UNCLIP_STEPS = 2


# --------------------------------------------------------------------------------------------
# Model look-up: which pipeline a model is, from its model_index.json
# --------------------------------------------------------------------------------------------


def pipeline_class_name(model: str, *, key: str = "generate.model") -> str:
    """The ``_class_name`` in ``model``'s ``model_index.json`` (e.g. ``"StableDiffusionPipeline"``).

    ``model`` is a local folder written by ``save_pretrained`` or a Hugging Face id (read through
    the local Hugging Face cache, downloading the one small file when the Hub is reachable).
    ``key`` names the config key in error messages.
    """
    return _class_name(model, key, "model_index.json", "DiffusionPipeline.save_pretrained")


def model_class_name(model: str, *, key: str) -> str:
    """The ``_class_name`` in the ``config.json`` of a single model (e.g. ``"AutoencoderTiny"``),
    read as :func:`pipeline_class_name` reads a pipeline's."""
    return _class_name(model, key, "config.json", "the model's save_pretrained")


def _class_name(model: str, key: str, filename: str, saved_by: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        index = path / filename
        if not index.is_file():
            raise ConfigError(f"{key}={model!r} is a folder without {filename}; point it at a folder written by {saved_by}")
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"{key}={model!r} is neither an existing folder nor a Hugging Face id like 'stabilityai/sd-turbo'"
        )
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(model, filename))
        except Exception as exc:  # offline and not cached, 401/404 from the Hub, no network
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            reason = (
                "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
                if offline
                else f"it is not in the local Hugging Face cache and the Hub could not be reached or refused it ({type(exc).__name__})"
            )
            raise ConfigError(
                f"cannot load {key}={model!r}: {reason}. Fix: download it where the Hub is reachable "
                "(huggingface-cli download, or DiffusionPipeline.from_pretrained(...).save_pretrained(folder)) "
                f"and pass {key}=<that folder>, or make the Hub reachable from every node"
            ) from exc
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{key}={model!r}: {index} has no readable _class_name ({type(exc).__name__}); "
            f"point it at a folder written by {saved_by}"
        ) from exc
    return str(name)


def resolve_model(model: str, key: str, *, pipeline: bool = True) -> str:
    """Check, before Ray starts, that ``model`` can be loaded (see :func:`pipeline_class_name`, or
    :func:`model_class_name` for a single model with ``pipeline=False``); returns a local folder
    made absolute (actors run in other working directories), an id unchanged."""
    (pipeline_class_name if pipeline else model_class_name)(model, key=key)
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _auto_task_class(task: str, class_name: str) -> Optional[str]:
    """The diffusers pipeline class for ``task`` (``"img2img"`` or ``"inpaint"``) of the model family
    ``class_name`` belongs to, or None. Kandinsky families are left out: diffusers' auto pipelines
    give them combined pipelines that look their prior up on the Hub."""
    from diffusers.pipelines import auto_pipeline as ap

    mappings = [ap.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, ap.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, ap.AUTO_INPAINT_PIPELINES_MAPPING]
    family = next((k for m in mappings for k, cls in m.items() if cls.__name__ == class_name), None)
    if family is None or family.startswith("kandinsky"):
        return None
    target = {"img2img": ap.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, "inpaint": ap.AUTO_INPAINT_PIPELINES_MAPPING}[task]
    cls = target.get(family)
    return cls.__name__ if cls is not None else None


# --------------------------------------------------------------------------------------------
# Driver-side checks
# --------------------------------------------------------------------------------------------


def _check_pair(prior_key: str, prior: Optional[str], model_key: str, model: str, model_cls: str) -> None:
    """A prior + decoder pair: the prior a prior pipeline, the model its decoder."""
    if model_cls in PRIOR_CLASSES:
        raise ConfigError(
            f"{model_key}={model!r} is a prior ({model_cls}), not a decoder. Fix: set {prior_key}={model!r} "
            f"and {model_key}=<its decoder> (e.g. {KANDINSKY_DECODER_EXAMPLE})"
        )
    if not prior:
        raise ConfigError(
            f"{model_key}={model!r} is a decoder ({model_cls}) that needs a prior. "
            f"Fix: set {prior_key}=<its prior> (e.g. {KANDINSKY_PRIOR_EXAMPLE})"
        )
    prior_cls = pipeline_class_name(prior, key=prior_key)
    if prior_cls not in PRIOR_CLASSES:
        raise ConfigError(
            f"{prior_key}={prior!r} is a {prior_cls}, not a prior pipeline. "
            f"Fix: set {prior_key} to a Kandinsky 2.2 prior (e.g. {KANDINSKY_PRIOR_EXAMPLE})"
        )
    if model_cls not in DECODER_CLASSES:
        raise ConfigError(
            f"{prior_key}={prior!r} is a prior without a decoder: {model_key}={model!r} is a {model_cls}. "
            f"Fix: set {model_key} to the prior's decoder (e.g. {KANDINSKY_DECODER_EXAMPLE})"
        )


def _check_decoder(decoder: str, model: str, model_cls: str, prior: Optional[str]) -> None:
    """generate.decoder: a tiny autoencoder, for a pipeline that decodes latents with a VAE."""
    if prior or model_cls in PRIOR_CLASSES + DECODER_CLASSES + UNCLIP_CLASSES:
        raise ConfigError(
            f"generate.decoder={decoder!r} replaces a Stable Diffusion VAE, and generate.model={model!r} ({model_cls}) "
            "decodes with its own MoVQ or super-resolution stages. Fix: set generate.decoder=null"
        )
    decoder_cls = model_class_name(decoder, key="generate.decoder")
    if decoder_cls != TINY_DECODER_CLASS:
        raise ConfigError(
            f"generate.decoder={decoder!r} is not a tiny autoencoder: its config.json names {decoder_cls}, not {TINY_DECODER_CLASS}. Fix: give a tiny "
            "autoencoder for the model's latents (e.g. madebyollin/taesd for SD 1.x/2.x and SD-Turbo), or null for the pipeline's VAE"
        )


def _derive_on(d: DeriveConfig) -> tuple[bool, bool, bool, bool]:
    """(img2img variations, embedding variations, fusion, inpainting): which techniques are on."""
    variations = d.variations.count > 0
    return (
        variations and d.variations.method == "img2img",
        variations and d.variations.method == "embedding",
        d.fusion.per_class > 0,
        d.inpainting.count > 0,
    )


def check_models(cfg: Config) -> None:
    """Refuse, before Ray starts, model combinations the diffusers generator and deriver cannot run.

    Reads only the models' ``model_index.json`` (see :func:`pipeline_class_name`); raises
    :class:`ConfigError` with one line that names the fix.
    """
    # 1. generate: a single text-to-image pipeline, or a prior + decoder pair.
    g = cfg.generate
    if g.generator == "diffusers" and g.enabled:
        model_cls = pipeline_class_name(g.model, key="generate.model")
        if g.prior or model_cls in PRIOR_CLASSES + DECODER_CLASSES:
            _check_pair("generate.prior", g.prior, "generate.model", g.model, model_cls)
        if g.decoder:
            _check_decoder(g.decoder, g.model, model_cls, g.prior)

    # 2. derive, only when some technique is on.
    d = cfg.derive
    img2img, embedding, fusion, inpainting = _derive_on(d)
    if d.generator != "diffusers" or not (img2img or embedding or fusion or inpainting):
        return
    if embedding or fusion:
        what = "derive.variations.method=embedding" if embedding else "derive.fusion.per_class>0"
        if not d.prior:
            raise ConfigError(
                f"{what} needs a Kandinsky 2.2 prior (its image encoder) and decoder. Fix: set "
                f"derive.prior=<prior> (e.g. {KANDINSKY_PRIOR_EXAMPLE}) and derive.model=<decoder> (e.g. {KANDINSKY_DECODER_EXAMPLE})"
            )
        _check_pair("derive.prior", d.prior, "derive.model", d.model, pipeline_class_name(d.model, key="derive.model"))
    for on, task, key, model in (
        (img2img, "img2img", "derive.model", d.model),
        (inpainting, "inpaint", "derive.inpainting.model" if d.inpainting.model else "derive.model", d.inpainting.model or d.model),
    ):
        if not on:
            continue
        model_cls = pipeline_class_name(model, key=key)
        if _auto_task_class(task, model_cls) is None:
            what = "derive.variations.method=img2img" if task == "img2img" else "derive.inpainting"
            pipeline = "image-to-image" if task == "img2img" else "inpainting"
            if model_cls in PRIOR_CLASSES + DECODER_CLASSES and task == "img2img":
                fix = "use derive.variations.method=embedding (the Kandinsky prior's image embedding, decoded anew)"
            elif task == "img2img":
                fix = "set derive.model to a Stable Diffusion model (e.g. stabilityai/sd-turbo), or use derive.variations.method=embedding with a Kandinsky 2.2 prior + decoder"
            else:
                fix = "set derive.inpainting.model to an inpainting or Stable Diffusion model (e.g. stabilityai/stable-diffusion-2-inpainting)"
            raise ConfigError(f"{what} needs an {pipeline} pipeline, and {key}={model!r} ({model_cls}) has none in diffusers. Fix: {fix}")


# --------------------------------------------------------------------------------------------
# Shared helpers: device, loading, per-image generators, output conversion
# --------------------------------------------------------------------------------------------


def _device_and_dtype(dtype_name: str):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Half precision only where it is fast and supported; CPU inference stays in float32.
    dtype = getattr(torch, dtype_name) if device.type == "cuda" else torch.float32
    return device, dtype


def _ready(pipe, device, channels_last: bool):
    """Quiet, without a safety checker, on ``device``; channels-last convolutions if asked (generate.channels_last)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # 32 px classifier data; the checker blacks out images
    pipe.to(device)
    if channels_last:
        for name in ("unet", "vae", "transformer", "movq", "decoder"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
    return pipe


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def _generators(device, seeds: Sequence[int]) -> list:
    """One generator per image: an image depends only on its own seed, not on its batch."""
    import torch

    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _to_uint8_hwc(x) -> np.ndarray:
    import torch

    # (B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, converted on the device
    return (x * 255).round_().to(dtype=torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _finish(images, image_size: int, keep_full: bool) -> GeneratedImages:
    """(B, 3, H, W) float in [0, 1] on the device -> small (and full) uint8 images."""
    import torch.nn.functional as F

    images = images.float().clamp_(0, 1)
    small = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    return GeneratedImages(small=_to_uint8_hwc(small), full=_to_uint8_hwc(images) if keep_full else None)


def _fit(img: np.ndarray, height: int, width: int) -> "Image.Image":
    """(H, W, 3) uint8 of any size -> a PIL image of exactly height x width: scaled to cover, centre-cropped."""
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
    scale = max(height / pil.height, width / pil.width)
    w, h = max(width, round(pil.width * scale)), max(height, round(pil.height * scale))
    if (w, h) != pil.size:
        pil = pil.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return pil.crop((left, top, left + width, top + height))


def _mask_image(kind: str, height: int, width: int, seed: int) -> "Image.Image":
    """The inpainting mask as diffusers wants it: an L image, white (255) where the edit repaints."""
    from PIL import Image

    return Image.fromarray(inpaint_mask(kind, height, width, seed).astype(np.uint8) * 255, mode="L")


def _load_kandinsky(prior: str, decoder: str, device, dtype, channels_last: bool):
    """The two Kandinsky 2.2 pipelines, each from its own folder or id (no combined-pipeline Hub look-up)."""
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(prior, dtype=dtype)
    decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder, dtype=dtype)
    return _ready(prior_pipe, device, channels_last), _ready(decoder_pipe, device, channels_last)


def _load_unclip(model: str):
    """An UnCLIPPipeline, component by component: diffusers 0.42 cannot resolve the text_proj entry of
    its model_index.json (the pipeline moved to diffusers.pipelines.deprecated), even when passed."""
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    classes = {
        "prior": PriorTransformer, "decoder": UNet2DConditionModel, "text_proj": UnCLIPTextProjModel,
        "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
        "super_res_first": UNet2DModel, "super_res_last": UNet2DModel, "prior_scheduler": UnCLIPScheduler,
        "decoder_scheduler": UnCLIPScheduler, "super_res_scheduler": UnCLIPScheduler,
    }  # fmt: skip
    return UnCLIPPipeline(**{name: cls.from_pretrained(model, subfolder=name) for name, cls in classes.items()})


def _decode_embeddings(decoder, embeds, negative, seeds, device, height: int, width: int, steps: int, guidance: float):
    """Kandinsky 2.2 decoder: (B, D) image embeddings -> (B, 3, H, W) in [0, 1] on the device."""
    images = decoder(
        image_embeds=embeds,
        negative_image_embeds=negative,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=_generators(device, seeds),
        output_type="pt",
    ).images  # (B, 3, H, W) in [-1, 1]: the decoder's "pt" output is not rescaled
    return images * 0.5 + 0.5


# --------------------------------------------------------------------------------------------
# Text to image: speed switches, prompt embeddings, the generator
# --------------------------------------------------------------------------------------------


def _load_text2img(cfg: GenerateConfig, device, dtype):
    """``generate.model`` through ``AutoPipelineForText2Image``, with ``generate.decoder`` (a tiny
    autoencoder) in place of its VAE when set (the VAE is then never loaded), on ``device``."""
    from diffusers import AutoencoderTiny, AutoPipelineForText2Image
    from diffusers.utils import logging as diffusers_logging

    if not cfg.decoder:
        return _ready(AutoPipelineForText2Image.from_pretrained(cfg.model, dtype=dtype), device, cfg.channels_last)
    # diffusers warns that the pipeline's vae should be an AutoencoderKL (a tiny one is its documented
    # use) and that AutoencoderTiny's own config has a key it ignores: noise on every actor, kept out.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        vae = AutoencoderTiny.from_pretrained(cfg.decoder, dtype=dtype)
        pipe = AutoPipelineForText2Image.from_pretrained(cfg.model, dtype=dtype, vae=vae)
    finally:
        diffusers_logging.set_verbosity(level)
    return _ready(pipe, device, cfg.channels_last)


def _speed_up(pipe, cfg: GenerateConfig) -> None:
    """generate.attention, fuse_qkv and compile on a UNet + VAE pipeline, in place (others: unchanged)."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or vae is None:
        return
    full_vae = isinstance(vae, AutoencoderKL)  # a tiny autoencoder has no attention to change
    if cfg.attention == "classic":
        for module in (unet, vae) if full_vae else (unet,):
            module.set_attn_processor(AttnProcessor())
    if cfg.fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=full_vae)
    if cfg.compile:
        # Compiled on the first batch of each shape (and again for a short last batch): minutes on a CPU.
        unet.compile(fullgraph=True)
        vae.decode = torch.compile(vae.decode, fullgraph=True)


class PromptEmbeddings:
    """The text encoder's output for each unique text (prompt or negative), kept by one actor.

    Templates repeat (a 36,000-image run has ~5,400 distinct prompts), so most batches find every
    embedding here. The texts a batch misses are encoded together in one call, exactly as the
    pipeline encodes a batch; the least recently used entries go beyond ``size``.
    """

    def __init__(self, pipe, device, size: int):
        self.pipe, self.device, self.size = pipe, device, size
        self.cache: OrderedDict[str, object] = OrderedDict()  # text -> (77, D) tensor on the device
        self.encoded = self.reused = 0

    def __call__(self, texts: Sequence[str]):
        """(B, 77, D) embeddings of ``texts``, in order."""
        import torch

        found = {}
        for text in texts:
            if text in self.cache:
                self.cache.move_to_end(text)
                found[text] = self.cache[text]
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            embeds = self.pipe.encode_prompt(missing, self.device, 1, False)[0]  # (M, 77, D)
            for text, embed in zip(missing, embeds):
                found[text] = self.cache[text] = embed.clone()  # its own storage, not a view of the batch's
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        self.encoded += len(missing)
        self.reused += len(texts) - len(missing)
        return torch.stack([found[t] for t in texts])

    def pipeline_kwargs(self, prompts: Sequence[str], negatives: Optional[Sequence[str]]) -> dict:
        """What the pipeline takes instead of ``prompt`` / ``negative_prompt``."""
        kwargs = {"prompt_embeds": self(prompts)}
        if negatives is not None:
            kwargs["negative_prompt_embeds"] = self(negatives)
        return kwargs


class DiffusersGenerator:
    """A diffusers text-to-image model, loaded once; the whole image path stays on the device.

    Three kinds, chosen by the config and the model's ``model_index.json``:

    - ``generate.prior`` set: the prior turns each prompt into a CLIP image embedding, the decoder
      (``generate.model``) renders it (Kandinsky 2.2). Both use ``steps`` (the prior at least
      :data:`MIN_UNCLIP_STEPS`) and ``guidance_scale``.
    - an ``UnCLIPPipeline`` (Karlo): prior, decoder and super-resolution in one pipeline, all at
      ``steps`` (at least :data:`MIN_UNCLIP_STEPS`); it renders at its own resolution (``height``/``width`` do not apply) and takes no
      negative prompt.
    - anything else: ``AutoPipelineForText2Image`` (Stable Diffusion, SD-Turbo, SDXL, ...), with
      the speed switches of ``generate.*``: a tiny decoder in place of the VAE, cached prompt
      embeddings (:class:`PromptEmbeddings`), SDPA or classic attention, fused QKV projections,
      torch.compile (:func:`_speed_up`). channels_last applies to every kind.
    """

    needs_model: ClassVar[bool] = True

    @classmethod
    def model_name(cls, cfg: GenerateConfig) -> str:
        return f"{cfg.prior} -> {cfg.model}" if cfg.prior else cfg.model

    def __init__(self, cfg: GenerateConfig, classes: Sequence[str]):
        from diffusers import StableDiffusionPipeline

        self.cfg = cfg
        self.device, dtype = _device_and_dtype(cfg.dtype)
        _quiet_diffusers()
        self.prior = self.embeddings = None
        if cfg.prior:
            self.kind = "prior"
            self.prior, self.pipe = _load_kandinsky(cfg.prior, cfg.model, self.device, dtype, cfg.channels_last)
        elif pipeline_class_name(cfg.model) in UNCLIP_CLASSES:
            self.kind = "unclip"
            self.pipe = _ready(_load_unclip(cfg.model).to(dtype), self.device, cfg.channels_last)
        else:
            self.kind = "text2img"
            self.pipe = _load_text2img(cfg, self.device, dtype)
            _speed_up(self.pipe, cfg)
            # The cache takes encode_prompt's (embeds, negative embeds) form: Stable Diffusion 1.x/2.x, SD-Turbo.
            if cfg.prompt_cache > 0 and isinstance(self.pipe, StableDiffusionPipeline):
                self.embeddings = PromptEmbeddings(self.pipe, self.device, cfg.prompt_cache)

    def generate(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str],
        seeds: Sequence[int],
        guidance_scales: Optional[Sequence[Optional[float]]] = None,
    ) -> GeneratedImages:
        """One image per prompt; ``guidance_scales``: one per prompt (None: ``generate.guidance_scale``).

        Rows are grouped by guidance value, one pipeline call per group, and returned in their
        order; a batch without values of its own is one call, exactly as without the argument.
        """
        default = self.cfg.guidance_scale
        scales = [default if g is None else float(g) for g in (guidance_scales or [None] * len(prompts))]
        groups: dict[float, list[int]] = {}
        for i, g in enumerate(scales):
            groups.setdefault(g, []).append(i)
        if len(groups) == 1:
            return self._generate(prompts, negatives, seeds, scales[0] if scales else default)
        order, smalls, fulls = [], [], []
        for g, idx in groups.items():
            images = self._generate([prompts[i] for i in idx], [negatives[i] for i in idx], [seeds[i] for i in idx], g)
            order += idx
            smalls.append(images.small)
            if images.full is not None:
                fulls.append(images.full)
        back = np.argsort(order)  # position of each original row in the concatenated groups
        small = np.concatenate(smalls)[back]
        full = np.concatenate(fulls)[back] if fulls else None
        return GeneratedImages(small=small, full=full)

    def _generate(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int], guidance: float) -> GeneratedImages:
        import torch

        cfg = self.cfg
        # Negative prompts only act through classifier-free guidance (scale > 1).
        guided = guidance > 1.0
        with torch.inference_mode():
            if self.kind == "prior":
                images = self._prior_decoder(list(prompts), list(negatives) if guided else None, seeds, guidance)
            elif self.kind == "unclip":
                images = self.pipe(
                    prompt=list(prompts),
                    prior_num_inference_steps=max(cfg.steps, MIN_UNCLIP_STEPS),
                    decoder_num_inference_steps=max(cfg.steps, MIN_UNCLIP_STEPS),
                    super_res_num_inference_steps=max(cfg.steps, MIN_UNCLIP_STEPS),
                    prior_guidance_scale=guidance,
                    decoder_guidance_scale=guidance,
                    generator=_generators(self.device, seeds),
                    output_type="np",
                ).images  # (B, H, W, 3) float in [0, 1], on the CPU whatever the device
                images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
            else:
                if self.embeddings is not None:
                    text = self.embeddings.pipeline_kwargs(prompts, negatives if guided else None)
                else:
                    text = {"prompt": list(prompts), "negative_prompt": list(negatives) if guided else None}
                images = self.pipe(
                    **text,
                    num_inference_steps=cfg.steps,
                    guidance_scale=guidance,
                    height=cfg.height,
                    width=cfg.width,
                    generator=_generators(self.device, seeds),
                    output_type="pt",
                ).images  # (B, 3, H, W) in [0, 1], on the device
            return _finish(images, cfg.image_size, cfg.keep_full_resolution)

    def _prior_decoder(self, prompts: list[str], negatives: Optional[list[str]], seeds: Sequence[int], guidance: float):
        cfg = self.cfg
        # With negatives the prior runs prompts + negatives as one batch of 2B (a negative's image
        # embedding is diffused too): each half gets its own generators, seeded by the image's seed.
        prior_seeds = list(seeds) * (2 if negatives is not None else 1)
        out = self.prior(
            prompt=prompts,
            negative_prompt=negatives,
            num_inference_steps=max(cfg.steps, MIN_UNCLIP_STEPS),
            guidance_scale=guidance,
            generator=_generators(self.device, prior_seeds),
            output_type="pt",
        )  # image_embeds, negative_image_embeds: (B, D); without negatives the latter is the zero-image embedding
        return _decode_embeddings(
            self.pipe, out.image_embeds, out.negative_image_embeds, seeds, self.device,
            cfg.height, cfg.width, cfg.steps, guidance,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Image-conditioned: variations, fusion, inpainting
# --------------------------------------------------------------------------------------------

# Params each row carries for itself (a fusion's weight, an edit's mask); the rest must match for
# rows to share a pipeline call.
PER_ROW_PARAMS = ("weight", "mask")


class DiffusersDeriver:
    """Children of parent images, made with diffusers pipelines loaded once per actor.

    Loads only what the enabled techniques need: ``derive.model`` as an image-to-image pipeline
    (img2img variations), ``derive.prior`` + ``derive.model`` as Kandinsky 2.2's prior and decoder
    (embedding variations, fusion), ``derive.inpainting.model`` (or ``derive.model``) as an
    inpainting pipeline. Resolution, steps for the Kandinsky decoder, guidance, dtype and output
    sizes come from ``generate.*``.
    """

    needs_model: ClassVar[bool] = True

    @classmethod
    def model_name(cls, cfg: DeriveConfig) -> str:
        """The models of the enabled techniques, each once, joined by ', '."""
        img2img, embedding, fusion, inpainting = _derive_on(cfg)
        names = []
        if img2img:
            names.append(cfg.model)
        if embedding or fusion:
            names.append(f"{cfg.prior} -> {cfg.model}")
        if inpainting:
            names.append(cfg.inpainting.model or cfg.model)
        return ", ".join(dict.fromkeys(names)) or cfg.model

    def __init__(self, cfg: DeriveConfig, gen: GenerateConfig, classes: Sequence[str]):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        self.cfg, self.gen = cfg, gen
        self.device, dtype = _device_and_dtype(gen.dtype)
        _quiet_diffusers()
        img2img, embedding, fusion, inpainting = _derive_on(cfg)
        self.img2img = self.prior = self.decoder = self.inpaint = None
        if img2img:
            self.img2img = _ready(AutoPipelineForImage2Image.from_pretrained(cfg.model, dtype=dtype), self.device, gen.channels_last)
        if embedding or fusion:
            self.prior, self.decoder = _load_kandinsky(cfg.prior, cfg.model, self.device, dtype, gen.channels_last)
        if inpainting:
            model = cfg.inpainting.model or cfg.model
            if self.img2img is not None and model == cfg.model:
                # Same weights as the img2img pipeline: share its components, load nothing more.
                self.inpaint = _ready(AutoPipelineForInpainting.from_pipe(self.img2img), self.device, gen.channels_last)
            else:
                self.inpaint = _ready(AutoPipelineForInpainting.from_pretrained(model, dtype=dtype), self.device, gen.channels_last)

    def derive(self, rows: Sequence[dict], parents: Mapping[str, np.ndarray]) -> GeneratedImages:
        """One child per row, in the rows' order; each a function of its own row and parents only.

        Rows are grouped by technique and params, so each pipeline call gets a homogeneous batch.
        """
        import torch

        groups: dict[tuple[str, str], list[int]] = {}
        for i, row in enumerate(rows):
            if row["technique"] not in DERIVE_TECHNIQUES:
                raise ValueError(f"row {row['id']}: unknown technique {row['technique']!r}; expected one of {DERIVE_TECHNIQUES}")
            shared = {k: v for k, v in row["params"].items() if k not in PER_ROW_PARAMS}
            groups.setdefault((row["technique"], json.dumps(shared, sort_keys=True)), []).append(i)
        smalls: list[Optional[np.ndarray]] = [None] * len(rows)
        fulls: list[Optional[np.ndarray]] = [None] * len(rows)
        with torch.inference_mode():
            for (technique, params_json), idx in groups.items():
                group = [rows[i] for i in idx]
                params = json.loads(params_json)  # shared by the group; PER_ROW_PARAMS are read from each row
                if technique == "variation" and params.get("method", "img2img") == "embedding":
                    images = self._embedding_variations(group, parents)
                elif technique == "variation":
                    images = self._img2img(group, parents, params)
                elif technique == "fusion":
                    images = self._fusion(group, parents, params)
                else:
                    images = self._inpaint(group, parents, params)
                out = _finish(images, self.gen.image_size, self.gen.keep_full_resolution)
                for j, i in enumerate(idx):
                    smalls[i] = out.small[j]
                    fulls[i] = out.full[j] if out.full is not None else None
        small = np.stack(smalls) if rows else np.zeros((0, self.gen.image_size, self.gen.image_size, 3), np.uint8)
        full = np.stack(fulls) if rows and self.gen.keep_full_resolution else None
        return GeneratedImages(small=small, full=full)

    # Each technique: rows of one group -> (B, 3, H, W) float in [0, 1] on the device.

    def _parents(self, group: Sequence[dict], parents: Mapping[str, np.ndarray], k: int = 0) -> list:
        return [_fit(parents[r["parents"][k]], self.gen.height, self.gen.width) for r in group]

    def _text_kwargs(self, group: Sequence[dict]) -> dict:
        guided = self.gen.guidance_scale > 1.0  # negatives act only through classifier-free guidance
        return {
            "prompt": [r["prompt"] for r in group],
            "negative_prompt": [r["negative"] for r in group] if guided else None,
            "guidance_scale": self.gen.guidance_scale,
            "generator": _generators(self.device, [r["seed"] for r in group]),
            "output_type": "pt",
        }

    def _require(self, pipe, what: str):
        if pipe is None:
            raise RuntimeError(f"a {what} row reached a deriver built without that technique enabled in derive.*")
        return pipe

    def _img2img(self, group, parents, params):
        pipe = self._require(self.img2img, "variation (img2img)")
        return pipe(
            image=self._parents(group, parents),
            strength=float(params["strength"]),
            num_inference_steps=int(params["steps"]),
            **self._text_kwargs(group),
        ).images  # (B, 3, H, W) in [0, 1]

    def _inpaint(self, group, parents, params):
        pipe = self._require(self.inpaint, "inpainting")
        h, w = self.gen.height, self.gen.width
        return pipe(
            image=self._parents(group, parents),
            mask_image=[_mask_image(r["params"]["mask"], h, w, int(r["seed"])) for r in group],
            height=h,
            width=w,
            strength=float(params["strength"]),
            num_inference_steps=int(params["steps"]),
            **self._text_kwargs(group),
        ).images  # (B, 3, H, W) in [0, 1]

    def _embedding_variations(self, group, parents):
        import torch

        prior = self._require(self.prior, "variation (embedding)")
        # The prior's CLIP image encoder embeds each parent (as KandinskyV22PriorPipeline.interpolate
        # does); the negative is the zero image's embedding, the prior's own unconditional one.
        embeds = []
        for image in self._parents(group, parents):  # one at a time: an embedding never depends on its batch
            pixels = prior.image_processor(image, return_tensors="pt").pixel_values
            pixels = pixels.to(device=self.device, dtype=prior.image_encoder.dtype)
            embeds.append(prior.image_encoder(pixels).image_embeds)  # (1, D)
        embeds = torch.cat(embeds)
        negative = prior.get_zero_embed(len(group), device=self.device)
        return self._decode(embeds, negative, group)

    def _fusion(self, group, parents, params):
        import torch

        prior = self._require(self.prior, "fusion")
        embeds, negatives = [], []
        for row, a, b in zip(group, self._parents(group, parents, 0), self._parents(group, parents, 1)):
            weight = float(row["params"]["weight"])
            out = prior.interpolate(
                [a, b],
                [weight, 1.0 - weight],
                num_inference_steps=max(self.gen.steps, MIN_UNCLIP_STEPS),
                guidance_scale=self.gen.guidance_scale,
                generator=_generators(self.device, [row["seed"]])[0],
                device=self.device,
            )
            embeds.append(out.image_embeds)  # (1, D)
            negatives.append(out.negative_image_embeds)
        return self._decode(torch.cat(embeds), torch.cat(negatives), group)

    def _decode(self, embeds, negative, group):
        g = self.gen
        return _decode_embeddings(
            self.decoder, embeds, negative, [r["seed"] for r in group], self.device,
            g.height, g.width, g.steps, g.guidance_scale,
        )  # fmt: skip

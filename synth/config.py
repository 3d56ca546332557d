"""Typed configuration: one dataclass per stage, YAML presets, ``key=value`` overrides.

A config is built in three layers, each overriding the one before:

1. the dataclass defaults below (the schema),
2. a YAML preset, which may name the file it extends with ``base: other.yaml``,
3. ``key=value`` overrides from the command line (OmegaConf dotlist syntax).

Values may be OmegaConf interpolations (``${train.seeds}``, ``${oc.env:NAME,default}``), resolved
when the config loads; ``???`` (OmegaConf's "no value yet") is refused, in a file or an override.

Everything is validated before Ray starts: an unknown key, a wrong type or shape, an out-of-range
value, unreadable YAML or an interpolation that does not resolve raises :class:`ConfigError` with
one line that names the key and the fix.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, OmegaConfBaseException

from synth.images import MASKS

CIFAR10_ANIMALS = ["bird", "cat", "deer", "dog", "frog", "horse"]


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class StorageConfig:
    # A local folder, or s3://bucket/prefix. Credentials come from the standard AWS chain.
    root: str = "outputs"
    # Endpoint for S3-compatible servers (MinIO, moto, Ceph); None uses AWS or $AWS_ENDPOINT_URL.
    s3_endpoint_url: Optional[str] = None
    s3_region: Optional[str] = None
    # How long one S3 operation keeps retrying transient failures (connection refused or reset,
    # timeouts, 5xx, throttling) with exponential backoff before the stage stops with an error.
    retry_seconds: float = 120.0


@dataclass
class RayConfig:
    # None: join the cluster named by $RAY_ADDRESS (set by `ray job submit`) or start a local one.
    address: Optional[str] = None
    # Logical CPUs of a local cluster; more than the cores so a two-stage pipeline never stalls.
    local_num_cpus: int = 4


@dataclass
class TechniqueMix:
    """Shares of a class's per_class prompt rows, by technique (see synth.prompts); they sum to 1."""

    vanilla: float = 0.1  # "a photo of a {cls}": plain class-name prompts
    environment: float = 0.6  # templates x environments x styles
    domain: float = 0.2  # "a {domain} of a {cls}": photo, drawing, painting, sketch, 3D render, ...
    hard: float = 0.1  # hard positive cases: occlusion, dim light, clutter
    llm: float = 0.0  # "A {cls} {text written by prompts.llm.model}"


@dataclass
class LLMConfig:
    """A local causal language model that writes short action/scene phrases per class (synth.llm)."""

    # A Hugging Face id or a local folder (save_pretrained) of a causal LM; an instruct model with
    # a chat template works best.
    model: str = "HuggingFaceTB/SmolLM2-360M-Instruct"
    # Distinct accepted texts wanted per class (llm rows cycle through them).
    per_class: int = 50
    seed: int = 0
    max_new_tokens: int = 24
    temperature: float = 0.9
    top_p: float = 0.95
    # Sampling rounds per class (each asks for per_class candidates) before giving up on more.
    attempts: int = 4
    # The full prompt: {text} is the model's phrase.
    template: str = "A {cls} {text}"
    # The text encoder's tokenizer the 77-token limit is counted with: null = generate.model's
    # "tokenizer" subfolder; or a folder / id holding a CLIP tokenizer.
    tokenizer: Optional[str] = None


@dataclass
class PromptsConfig:
    classes: List[str] = field(default_factory=lambda: list(CIFAR10_ANIMALS))
    per_class: int = 6000
    # "{cls}" is replaced by the class name, "{env}" by an environment, "{style}" by a style.
    templates: List[str] = field(
        default_factory=lambda: [
            "a photo of a {cls} {env}, {style}",
            "a close-up photo of a {cls} {env}, {style}",
            "a {cls} {env}, {style}",
            "a side view of a {cls} {env}, {style}",
            "a {cls} seen from a distance {env}, {style}",
            "a young {cls} {env}, {style}",
            "a wild {cls} {env}, {style}",
            "a full-body shot of a {cls} {env}, {style}",
        ]
    )
    environments: List[str] = field(
        default_factory=lambda: [
            "in a forest",
            "in a grassy field",
            "on a snowy hill",
            "near a river",
            "in a backyard",
            "on a farm",
            "in the city",
            "on a beach",
            "in tall reeds",
            "indoors",
            "at dusk",
            "in the rain",
        ]
    )
    styles: List[str] = field(
        default_factory=lambda: [
            "natural light",
            "overcast day",
            "telephoto lens",
            "wide-angle lens",
            "shallow depth of field",
            "amateur snapshot",
            "low resolution photo",
            "golden hour",
        ]
    )
    # Hard positive cases real photographs contain: occlusion, odd viewpoints, clutter, bad light.
    hard_templates: List[str] = field(
        default_factory=lambda: [
            "a {cls} partly hidden behind leaves",
            "a blurry photo of a {cls} in motion",
            "a {cls} far away in a cluttered scene",
            "a {cls} photographed from directly above",
            "a {cls} in very dim light at night",
            "a cropped photo showing only part of a {cls}",
            "a {cls} with an unusual coat color",
            "a grainy black and white photo of a {cls}",
        ]
    )
    # Plain class-name prompts (technique vanilla).
    vanilla_templates: List[str] = field(
        default_factory=lambda: ["a photo of a {cls}", "a {cls}", "a picture of a {cls}", "a close-up photo of a {cls}"]
    )
    # Technique domain: "{domain}" is replaced by one of domains (no vowel-initial entries: "a {domain}").
    domain_template: str = "a {domain} of a {cls}"
    domains: List[str] = field(
        default_factory=lambda: [
            "photo", "drawing", "painting", "sketch", "3D render", "watercolor painting", "cartoon",
            "pencil sketch", "charcoal drawing", "digital illustration", "low-poly model", "studio photograph",
        ]
    )  # fmt: skip
    # The share of each class's per_class rows per technique (see TechniqueMix); sums to 1.
    techniques: TechniqueMix = field(default_factory=TechniqueMix)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Hostile examples: the class's look on the wrong object, NOT the class (label = the class it
    # imitates): an evaluation set for the fooling rate. Extra rows per class, on top of per_class.
    hostile_per_class: int = 0
    hostile_templates: List[str] = field(
        default_factory=lambda: [
            "a {object} with the coat pattern and colours of a {cls}",
            "a {object} shaped like a {cls}",
            "a {object} made to look like a {cls}",
            "a {object} with the texture of a {cls}",
        ]
    )
    hostile_objects: List[str] = field(
        default_factory=lambda: [
            "car", "teapot", "sofa", "cloud", "building", "lamp", "backpack", "mug", "rock", "cake", "kite", "pillow",
        ]
    )  # fmt: skip
    # Per-image classifier-free guidance: [low, high], a seeded draw per row (recorded in the prompt
    # table's guidance_scale); null: every image uses generate.guidance_scale.
    guidance_scale_range: Optional[List[float]] = None
    negative_prompt: str = "text, watermark, cartoon, drawing, multiple animals, deformed"


@dataclass
class GenerateConfig:
    # false: no text-to-image; the synthetic images come from the derive stage alone (e.g.
    # variations of your own photos), and the pipeline skips the prompts and generate stages.
    enabled: bool = True
    # A registered name ("diffusers": a text-to-image pipeline loaded with from_pretrained) or
    # a class as "package.module:ClassName" implementing synth.generate's Generator protocol
    # (importable on the driver and every Ray worker).
    generator: str = "diffusers"
    # Hugging Face model id or a local folder written by save_pretrained (for generators that load one):
    # a text-to-image pipeline (Stable Diffusion, SD-Turbo, UnCLIP/Karlo), or, with a prior below,
    # the decoder of a prior + decoder pair (Kandinsky 2.2: kandinsky-community/kandinsky-2-2-decoder).
    model: str = "stabilityai/sd-turbo"
    # The prior of a prior + decoder pair (DALL-E 2's architecture: text -> CLIP image embedding ->
    # image), e.g. kandinsky-community/kandinsky-2-2-prior; None for single-pipeline models.
    prior: Optional[str] = None
    steps: int = 1
    guidance_scale: float = 0.0
    # Resolution the diffusion model renders at.
    height: int = 512
    width: int = 512
    # Resolution stored in the dataset (CIFAR-sized by default).
    image_size: int = 32
    keep_full_resolution: bool = False
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32 (float32 is used on CPU regardless)
    # Images per pipeline call inside an actor.
    batch_size: int = 32
    # What turns latents into pixels (Stable Diffusion family): null, the pipeline's own VAE; or a
    # tiny autoencoder (AutoencoderTiny, a Hugging Face id or a save_pretrained folder: e.g.
    # madebyollin/taesd for SD 1.x/2.x and SD-Turbo), ~18x fewer decoder FLOPs at 512 px, softer
    # detail. It changes the images, so the plan records it.
    decoder: Optional[str] = None
    # Text-encoder outputs each actor keeps, one per unique prompt or negative (least recently used
    # dropped first), reused by later batches; 0 encodes every batch anew. Byte-identical images.
    # Each is 77 x 1024 values for SD-Turbo: 1024 of them take ~160 MB in bf16, ~320 MB in float32.
    prompt_cache: int = 1024
    # Speed switches. attention: sdpa (torch's scaled_dot_product_attention, diffusers' default) |
    # classic (the explicit softmax(QK^T)V, for comparison). fuse_qkv: one projection for query, key
    # and value (needs sdpa). compile: torch.compile of the UNet and the decoder, once per actor and
    # batch shape (minutes before the first batch; keep shard_size a multiple of batch_size). These
    # three act on UNet + VAE pipelines (prior + decoder and UnCLIP models ignore them);
    # channels_last (NHWC convolutions) on every kind, derive included. channels_last, classic and
    # compile round differently (a few pixels move by 1/255), so they are off by default.
    attention: str = "sdpa"
    fuse_qkv: bool = True
    channels_last: bool = False
    compile: bool = False
    # Actor pool: num_actors actors, or with max_actors set, autoscaling between the two; GPUs per
    # actor ("auto" number: 1 if the cluster has GPUs, else 0); CPUs per actor (null: 1 for a CPU
    # actor, 0.5 beside a GPU; torch in a CPU actor uses that many threads, rounded down).
    num_actors: int = 1
    max_actors: Optional[int] = None
    num_gpus_per_actor: Optional[float] = None
    cpus_per_actor: Optional[float] = None
    # Images per storage shard: the unit of resumption and of atomic writes.
    shard_size: int = 128
    # Concurrent PNG-encoding and shard-writing tasks (null: as many as Ray Data schedules).
    writer_concurrency: Optional[int] = None


@dataclass
class VariationsConfig:
    # Children per parent (0: no variations). Child ids are <parent>-v<k>.
    count: int = 0
    # img2img: Stable Diffusion image-to-image from the parent (strength, steps below);
    # embedding: the prior's CLIP image embedding of the parent, decoded anew (Kandinsky 2.2, needs derive.prior).
    method: str = "img2img"
    # img2img: how far a child may move from its parent, in (0, 1]; steps * strength must reach 1 step.
    strength: float = 0.5
    steps: int = 2


@dataclass
class FusionConfig:
    # Fused images per class, each from a seeded pair of two different parents of the class (0: none).
    per_class: int = 0
    # Each pair's weight of its first parent is drawn (seeded) from [low, high]; the prior's image
    # embeddings are mixed with it (Kandinsky 2.2's interpolate) and decoded. Needs derive.prior.
    weight_range: List[float] = field(default_factory=lambda: [0.3, 0.7])


@dataclass
class InpaintingConfig:
    # Edits per parent (0: none). Child ids are <parent>-i<k>.
    count: int = 0
    # Which part is repainted: border (a ring around a kept centre), box (a seeded random box),
    # center (the centre, keeping the surroundings). Edit k uses masks[k % len(masks)].
    masks: List[str] = field(default_factory=lambda: ["border", "box", "center"])
    # The prompt of an edit: template with {cls} and {env}; the environment is drawn (seeded) per edit.
    template: str = "a photo of a {cls} {env}"
    environments: List[str] = field(
        default_factory=lambda: ["on a beach", "in a forest", "on a snowy hill", "in a city street", "indoors", "in a grassy field"]
    )
    strength: float = 1.0
    steps: int = 2
    # An inpainting pipeline (9-channel UNet, e.g. stabilityai/stable-diffusion-2-inpainting); None:
    # derive.model through diffusers' inpainting pipeline (SD-Turbo works, blending latents by the mask).
    model: Optional[str] = None


@dataclass
class DeriveConfig:
    """Image-conditioned generation from parent images: variations, fusion, inpainting.

    The derive stage is the generate stage's exactly-once shard job with another input table
    (one row per child, naming its parents) and another generator. Resolution, batch size,
    actors, shard size and dtype come from generate.*.
    """

    # "diffusers" (derive.model / derive.prior / derive.inpainting.model) or package.module:ClassName.
    generator: str = "diffusers"
    # The image-to-image pipeline, or the Kandinsky 2.2 decoder when derive.prior is set.
    model: str = "${generate.model}"
    prior: Optional[str] = "${generate.prior}"
    # Parents: "generate" (this run's generated images; full resolution where the generate stage
    # kept it) or a folder of your own photos <folder>/<class>/*.png|jpg|jpeg (local or s3://).
    parents: str = "generate"
    # Parents taken per class (a seeded choice), or None for all of them.
    parents_per_class: Optional[int] = None
    # The prompt of a child whose parent has none of its own (the user's photos) and of fusions.
    prompt: str = "a photo of a {cls}"
    variations: VariationsConfig = field(default_factory=VariationsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    inpainting: InpaintingConfig = field(default_factory=InpaintingConfig)


@dataclass
class DatasetConfig:
    # Real photographs: "cifar10" (the official python-format archive) or "folder"
    # (<real_path>/<split>/<class>/*.png|jpg with split in train/test).
    real_source: str = "cifar10"
    # Local path or s3:// URI: cifar-10-python.tar.gz, its extracted cifar-10-batches-py folder,
    # or an image-folder root. None with download=true: torchvision's downloader into download_dir.
    real_path: Optional[str] = None
    download: bool = False
    download_dir: str = ".cache/data"
    # Synthetic splits carved from the generate manifest, per class, mirroring CIFAR's 5,000/1,000.
    synthetic_train_per_class: int = 5000
    synthetic_test_per_class: int = 1000
    # Share of each training split held out for model selection and tuning (never a test split).
    val_fraction: float = 0.1
    seed: int = 0
    # Side of the square RGB images stored in every split (both domains are resized to it).
    image_size: int = 32
    # Which domains to build: [real] prepares real data before any images are generated.
    domains: List[str] = field(default_factory=lambda: ["real", "synthetic"])
    # Synthetic images of these techniques only (text-to-image: vanilla, environment, domain, hard, llm; from parent
    # images: variation, fusion, inpainting); None: every technique the generate and derive stages made.
    techniques: Optional[List[str]] = None
    # Which synthetic train/val images the train and tune stages read: all | curated (the curate
    # stage's accepted ones) | auto (curated when the curate stage has judged them, else all).
    synthetic_source: str = "auto"
    # Hostile examples (prompts.hostile_per_class): evaluate = only the test-only adversarial domain
    # (the fooling rate); other_class = also a training class "other" (K+1 labels) split like a class,
    # for models that must refuse them; the adversarial domain then holds the hostile test images.
    hostile: str = "evaluate"


@dataclass
class TrainAblationConfig:
    # What each technique buys: one cell per technique, trained only on that technique's synthetic
    # train images. null: off; [all]: every technique in the synthetic train split (hostile never);
    # or a list of names from TRAIN_TECHNIQUES.
    techniques: Optional[List[str]] = None
    # With / without the CLIP filter: ablate-curated (accepted images) vs ablate-uncurated (as many
    # images per class drawn from all of them). Needs the curate stage's verdicts.
    curation: bool = False
    # Images per class in every ablation cell; null: the smallest per-class count of the compared sets.
    images_per_class: Optional[int] = None


@dataclass
class TrainConfig:
    # Which cells of the train-domain x test-domain matrix to run, and how often.
    # Train domains: real | synthetic | mixture; each model is tested on every test domain.
    experiments: List[str] = field(default_factory=lambda: ["real", "synthetic", "mixture"])
    # adversarial: the hostile images (accuracy there is the fooling rate), skipped with a warning when the run has none.
    test_domains: List[str] = field(default_factory=lambda: ["real", "synthetic", "mixture", "adversarial"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # Share of synthetic images in the mixture's training set. Its size is fixed at
    # min(real train, synthetic train) images, so every fraction trains on as many images.
    mixture_synthetic_fraction: float = 0.5
    # Resources: Ray Train workers (DDP ranks), GPUs (None: use them when the cluster has them),
    # and how many worker-group failures Ray retries from the last checkpoint.
    num_workers: int = 1
    # CPUs Ray reserves for each worker; on a CPU the worker trains with as many torch threads.
    cpus_per_worker: float = 1.0
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    max_failures: int = 3
    # Network: multiplies airbench94's 64/256/256 channel widths (same in every cell).
    width: float = 1.0
    # Budget, identical in every cell: the global batch (split evenly across workers) and the
    # number of optimizer steps; epochs follow from steps, batch and training-set size.
    batch_size: int = 1024
    steps: int = 500  # ~10 epochs of 50k images (airbench94: 9.9), ~19 of 27k
    # SGD with Nesterov momentum: airbench94's recipe in PyTorch units on the batch-mean loss.
    lr: float = 1.5  # peak learning rate per 1024 images: the step uses lr * batch_size / 1024
    momentum: float = 0.85
    weight_decay: float = 1.33e-3  # SGD weight_decay (L2); BatchNorm biases: lr x64, decay /64
    label_smoothing: float = 0.2
    # The lr rises linearly from 0.2x to 1x over this share of steps, then falls to 0.07x.
    warmup_fraction: float = 0.23
    # Random-crop augmentation: reflect-pad by this many pixels, crop back (flips always on).
    translate: int = 2
    # Arithmetic: auto = bf16 autocast where bf16 is native (CUDA GPUs; CPUs with AVX512-BF16 or
    # AMX, ~2x faster there), float32 elsewhere. Convolutions run channels_last everywhere.
    precision: str = "auto"
    # Test-time augmentation for validation and test: 0 none, 1 mirror, 2 mirror + 1-px shifts.
    tta_level: int = 2
    eval_batch_size: int = 2048
    # Validation after each epoch (one view per image, for the curves and ASHA) on at most this
    # many images, an evenly spaced subset; null: the whole split. The final scores always use
    # the whole validation split with the full test-time augmentation.
    epoch_val_images: Optional[int] = None
    # Ablation cells (same seeds, network, recipe and steps as every cell); off by default.
    ablation: TrainAblationConfig = field(default_factory=TrainAblationConfig)


@dataclass
class TuneConfig:
    # The sweep: every synthetic fraction r crossed with every seed, one trial each. Network,
    # recipe and step budget come from train.* and are the same in every trial.
    ratios: List[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # fixed_budget: N = min(real train, synthetic train) images, round(r * N) of them synthetic,
    #   the rest real (the train stage's mixture at every r), so only the composition changes;
    # augment: every real train image plus round(r * real train) synthetic ones.
    mode: str = "fixed_budget"
    # Early stopping on real-val accuracy (ASHA, rungs counted in optimizer steps). Off by
    # default: a stopped trial leaves its ratio with fewer test numbers in the final table.
    asha: bool = False
    asha_grace_steps: Optional[int] = None  # None: a quarter of train.steps
    asha_reduction_factor: float = 3.0
    # Resources of one trial (one model on one device); trials at once: None fits as many as
    # the cluster's GPUs (or CPUs, without GPUs) allow.
    cpus_per_trial: float = 1.0
    gpus_per_trial: Optional[float] = None  # None: 1 when the cluster has GPUs, else 0
    max_concurrent_trials: Optional[int] = None
    # Tune restarts a failed trial from its last per-epoch checkpoint this many times.
    max_failures: int = 2


@dataclass
class CurateConfig:
    """CLIP scoring and filtering of every synthetic image (generate + derive), exactly once (synth.curate)."""

    # Off by default: the pipeline runs curate between generate/derive and dataset when true.
    enabled: bool = False
    # "clip" (transformers CLIPModel) or a class as package.module:ClassName (see synth.curate.Scorer).
    scorer: str = "clip"
    # Hugging Face id or a local folder written by save_pretrained (CLIPModel + processor + tokenizer).
    model: str = "openai/clip-vit-base-patch32"
    # The text each class is scored against; {cls} is the class name.
    prompt: str = "a photo of a {cls}"
    # Score the full-resolution images where the image stage kept them (else the stored dataset-size ones).
    full_resolution: bool = True
    # Actor pool: size and GPUs per actor (null: 1 if the cluster has GPUs, else 0); images per model call.
    num_actors: int = 1
    num_gpus_per_actor: Optional[float] = None
    batch_size: int = 64
    # Images per score shard: the unit of resumption and of atomic writes.
    shard_size: int = 1024
    # Filter rules (applied after scoring; changing them rescores nothing). null switches a rule off.
    min_similarity: Optional[float] = None  # cosine to the own class prompt, in [-1, 1]
    probability_rule: bool = False  # own class probability >= 1/K (He et al., ICLR 2023)
    min_probability: Optional[float] = None  # own class probability floor, in [0, 1]
    dedup_cosine: Optional[float] = None  # within a class, drop an image this close to a better-ranked kept one, in (0, 1]
    top_per_class: Optional[int] = None  # keep at most the N best-ranked per class
    min_per_class: Optional[int] = None  # keep at least M per class: rescue the best-ranked rejected ones


@dataclass
class ExportConfig:
    """Export of a finished dataset to ImageFolder, Hugging Face Parquet and WebDataset (synth.export)."""

    # Any of imagefolder | huggingface | webdataset.
    formats: List[str] = field(default_factory=lambda: ["imagefolder", "huggingface", "webdataset"])
    # Local folder or s3:// URI; null: <storage.root>/<run>/export.
    dest: Optional[str] = None
    # The synthetic splits always; real photographs (their licence is the source's) and the
    # test-only adversarial domain (hostile examples) only when asked.
    include_real: bool = False
    include_adversarial: bool = False
    # Synthetic images of these techniques only; null: every technique in the dataset's splits.
    techniques: Optional[List[str]] = None
    # all | accepted (the curate stage's verdict after review; needs a curated run).
    curation: str = "all"
    # Synthetic images at the generate / derive stage's full resolution where it kept them.
    full_resolution: bool = False
    # Samples per WebDataset tar and per Hugging Face Parquet file: the unit of resumption.
    shard_size: int = 1000
    # The dataset card's licence (a Hub licence id; "other" with the generator's terms in the prose).
    license: str = "other"
    # Sets of at most this many images are written in the driver process; larger ones by a Ray
    # Data job over shards (0: always Ray).
    in_process_max_images: int = 5000
    num_workers: int = 4


@dataclass
class WebConfig:
    """The Flask app (synth.web): limits that keep one server responsive and safe."""

    # Generation requests waiting for the one generator (a full queue answers 503 + Retry-After).
    queue_size: int = 4
    # Seconds a generation request waits for its image before it is answered 503.
    generate_timeout_s: float = 120.0
    # Largest uploaded image file, in bytes (larger answers 413).
    max_upload_bytes: int = 10 * 1024 * 1024
    # Largest uploaded image, in pixels per side and in total (decompression bombs are refused).
    max_image_side: int = 8192
    max_image_pixels: int = 40_000_000
    # Images per page when browsing a run's dataset or its review queue.
    page_size: int = 48


@dataclass
class Config:
    run: str = "default"
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    web: WebConfig = field(default_factory=WebConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_BASE_KEY = "base"
# What reading YAML text (a file, or an override's value) into OmegaConf raises on bad input.
_PARSE_ERRORS = (yaml.YAMLError, OmegaConfBaseException)


@functools.cache
def _schema() -> DictConfig:
    """The schema with its defaults, built once (most of the time a load takes) and read-only so it stays the defaults."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, True)
    return schema


def _one_line(text: str) -> str:
    """``text`` with its line breaks collapsed, so every error stays on one line of a terminal."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _reason(exc: BaseException, at: bool = True) -> str:
    """The part of a YAML or OmegaConf error a person needs, on one line (``at``: with the YAML line and column)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if at and mark is not None else ""
        return _one_line(f"{exc.problem}{where}")
    # The first line: OmegaConf and YAML reader errors go on with where the value sat, which the message says itself.
    msg = _one_line((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return msg if len(msg) <= 160 else msg[:157] + "..."  # OmegaConf quotes whole values


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML files from the root of the ``base:`` chain down to ``path``, each with its name."""
    path = path.resolve()
    named = f"config file {str(path)!r}" + (f" (the base: of {str(seen[-1])!r})" if seen else "")
    if path in seen:
        raise ConfigError(_one_line(f"config files extend each other in a loop: {' -> '.join(map(str, seen + (path,)))}"))
    if path.is_dir():
        raise ConfigError(f"{named} is a folder; name a YAML file such as configs/smoke.yaml")
    if not path.is_file():
        raise ConfigError(f"{named} does not exist; pass a path such as configs/smoke.yaml")
    try:
        node = OmegaConf.load(path)
    except OSError as exc:
        raise ConfigError(f"{named} cannot be read ({exc.strerror or exc}); check that it is a readable file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{named} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except _PARSE_ERRORS as exc:
        raise ConfigError(f"{named} is not valid YAML: {_reason(exc)}. Fix the file (or start from configs/smoke.yaml)") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{named} must hold a mapping of keys, not a list or value")
    chain: list[tuple[str, DictConfig]] = []
    if _BASE_KEY in node.keys():
        plain = not OmegaConf.is_missing(node, _BASE_KEY) and not OmegaConf.is_interpolation(node, _BASE_KEY)
        base = node.pop(_BASE_KEY) if plain else None
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"base: in {str(path)!r} must name a YAML file it extends, e.g. base: base.yaml")
        base_path = Path(base)
        chain = _read_yaml_chain(base_path if base_path.is_absolute() else path.parent / base_path, seen + (path,))
    return chain + [(str(path), node)]


def _read_override(override: str) -> tuple[str, DictConfig]:
    """One ``key=value`` override as a config layer; its value is read as YAML, as OmegaConf reads it."""
    if "=" not in override or override.startswith("="):
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. generate.batch_size=16)")
    key = override.split("=", 1)[0]
    try:
        return "the command line", OmegaConf.from_dotlist([override])
    except (*_PARSE_ERRORS, IndexError) as exc:  # IndexError: OmegaConf's key parser, on a key that opens with '['
        reason = _reason(exc, at=False)
        if isinstance(exc, yaml.YAMLError):
            fix = f"close brackets and quotes, or quote text ({key}='...')"
        elif isinstance(exc, GrammarParseError):
            fix = "close the ${...} interpolation, or write a literal ${ as \\${"
        else:
            reason, fix = "the key does not parse", "write the key as section.name, e.g. generate.batch_size=16"
        raise ConfigError(_one_line(f"cannot read override {override!r} for config key {key!r}: {reason}. Fix: {fix}")) from exc


def _unknown_key(key: str, source: str, parent: str | None = None) -> ConfigError:
    """``parent``: the section the key was found in (by default, all of ``key`` before its last dot)."""
    parent = (key.rsplit(".", 1)[0] if "." in key else "") if parent is None else parent
    return ConfigError(
        f"unknown config key {key!r} (from {source}); valid keys under {parent or 'the top level'!r}: "
        f"{', '.join(_valid_keys(parent))}. Fix the spelling or remove it."
    )


def _list_example(default: Optional[ListConfig]) -> str:
    items = [str(v) for v in (default or [])[:2]]  # a list that defaults to null has no items to show
    return f"[{','.join(items)}]" if items and all(re.fullmatch(r"[\w.-]+", v) for v in items) else "[first,second]"


def _kind(value: Any) -> str:
    return "list" if isinstance(value, ListConfig) else "mapping" if isinstance(value, DictConfig) else "single value"


def _check_layer(node: DictConfig, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Refuse, naming the key, what a merge would drop or choke on.

    A merge keeps the old value where a layer says ``???`` and raises a bare TypeError where a
    list meets a mapping, so every key of a layer is checked against the schema's shape first:
    known, not ``???``, and a section, a list of plain values or a single value where the schema
    has one. Interpolations of lists and values are left to the resolver, which reports on them
    after the merge.
    """
    for name in node.keys():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in schema:
            raise _unknown_key(key, source, prefix.rstrip("."))
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"config key {key!r} (from {source}) is ??? (no value); give it a value or drop it to keep the default")
        expected, interpolated = schema[name], OmegaConf.is_interpolation(node, name)
        if isinstance(expected, DictConfig):
            if interpolated or not isinstance(node[name], DictConfig):
                raise ConfigError(
                    f"config key {key!r} (from {source}) is a section, not a value; set the keys under it, "
                    f"e.g. {key}.{next(iter(expected.keys()))}=..."
                )
            _check_layer(node[name], expected, source, key + ".")
        elif interpolated:
            continue
        elif isinstance(schema._get_node(name), ListConfig):  # also a list that defaults to null
            if not (node[name] is None and expected is None):
                _check_list(node[name], expected, key, source)
        elif isinstance(node[name], (DictConfig, ListConfig)):
            raise ConfigError(
                f"config key {key!r} (from {source}) takes a single value, not a {_kind(node[name])}; "
                f"quote text that holds ': ', '[' or '{{' ({key}='...')"
            )


def _check_list(value: Any, default: ListConfig, key: str, source: str) -> None:
    example = f"{key}={_list_example(default)}"
    if not isinstance(value, ListConfig):
        why = "its items cannot be set one at a time" if isinstance(value, DictConfig) else "a list of one item is [x]"
        raise ConfigError(f"config key {key!r} (from {source}) takes a whole list, e.g. {example} ({why})")
    for i in range(len(value)):
        item = f"{key}[{i}]"
        if OmegaConf.is_missing(value, i):
            raise ConfigError(f"config key {item!r} (from {source}) is ??? (no value); give every item of {key} a value")
        if not OmegaConf.is_interpolation(value, i) and isinstance(value[i], (DictConfig, ListConfig)):
            raise ConfigError(
                f"config key {item!r} (from {source}) is a {_kind(value[i])}; {key} holds single values, e.g. {example} "
                "(quote an item that holds ': ' or ',')"
            )


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = _reason(exc)
    if isinstance(exc, (InterpolationResolutionError, GrammarParseError)):
        return ConfigError(
            f"cannot resolve config key {key!r} (from {source}): {msg}. Fix: make it resolve to a value of the declared type, "
            "e.g. ${train.steps} or ${oc.env:NAME,default}"
        )
    if "Key" in type(exc).__name__ or "not in struct" in msg or "Missing key" in msg:
        return _unknown_key(key, source)
    return ConfigError(f"bad value for config key {key!r} (from {source}): {msg}. Fix: give a value of the declared type.")


def _valid_keys(dotted_parent: str) -> list[str]:
    node: Any = _schema()
    for part in [p for p in dotted_parent.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(node.keys()) if isinstance(node, DictConfig) else sorted(_schema().keys())


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a YAML preset and ``key=value`` overrides.

    Every problem with the input, from a YAML syntax error to a ``???`` value or an
    interpolation that does not resolve, raises :class:`ConfigError` with one line that names
    the key and the fix.
    """
    # 1. Read every layer: the base: chain of YAML files, then each override on its own.
    layers = _read_yaml_chain(Path(path)) if path is not None else []
    layers += [_read_override(o) for o in overrides]
    # 2. Check each layer's keys and shapes against the schema, then merge in order.
    merged = _schema()  # merge copies its first argument, so the schema is never changed
    for source, node in layers:
        _check_layer(node, _schema(), source)
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as exc:
            raise _explain(exc, source) from exc
    # 3. Resolve interpolations and convert to the dataclasses; then the ranges and cross-field rules.
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "the merged config") from exc
    validate(cfg)
    return resolve_paths(cfg)


def resolve_paths(cfg: Config) -> Config:
    """Make a local ``storage.root`` absolute against the working directory of the process that loads the config.

    Done once, here, so every process that receives the config (Ray workers, actors and Tune
    trials each run in their own working directory) means the same folder; the resolved root
    is what each stage records in its ``config.yaml``.
    """
    from synth.storage import local_root

    if "://" not in cfg.storage.root:  # s3:// (or any URI) stays as given
        cfg.storage.root = local_root(cfg.storage.root)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Validation: ranges and cross-field rules the types cannot express
# --------------------------------------------------------------------------------------------

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The names synth.generate.GENERATORS registers (a test keeps the two equal); any other generator
# is given as an import path. Whether a path imports is checked when the generate stage starts.
GENERATOR_NAMES = ("diffusers",)
GENERATOR_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$", re.ASCII)
DTYPES = ("bfloat16", "float16", "float32")
PRECISIONS = ("auto", "bfloat16", "float32")


def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def _require_generator(key: str, value: str, example: str) -> None:
    _require(
        value in GENERATOR_NAMES or bool(GENERATOR_PATH.match(value)),
        key,
        value,
        f"choose a registered generator ({', '.join(GENERATOR_NAMES)}) or give a class as package.module:ClassName "
        f"(e.g. {example}, the tests' class-aware one)",
    )


def class_slug(name: str) -> str:
    """The id-safe form of a class name: 'oil painting' -> 'oil-painting'."""
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")


OTHER_CLASS = "other"  # the label of hostile examples with dataset.hostile=other_class
HOSTILE_MODES = ("evaluate", "other_class")


def label_classes(cfg: Config) -> list[str]:
    """The label space of splits, models, tune trials and the report: ``prompts.classes``, plus
    ``"other"`` (label K) when hostile examples train a class of their own (dataset.hostile=other_class).

    The prompts, generate, derive and curate stages make images of ``prompts.classes`` only.
    """
    classes = list(cfg.prompts.classes)
    return classes + [OTHER_CLASS] if cfg.dataset.hostile == "other_class" else classes


def validate(cfg: Config) -> None:
    _require(bool(_RUN_NAME.match(cfg.run)), "run", cfg.run, "use letters, digits, '.', '_' or '-' (at most 100)")
    root = cfg.storage.root
    _require(bool(root.strip()) and "\0" not in root, "storage.root", root, "give a local folder or s3://bucket/prefix")
    _require(
        not root.startswith("s3://") or bool(root[len("s3://") :].partition("/")[0]),
        "storage.root",
        root,
        "name the bucket: s3://bucket/prefix",
    )
    _require(
        0 <= cfg.storage.retry_seconds <= 86400, "storage.retry_seconds", cfg.storage.retry_seconds, "give 0 to 86400 seconds"
    )
    _require(cfg.ray.local_num_cpus >= 1, "ray.local_num_cpus", cfg.ray.local_num_cpus, "must be at least 1")

    p = cfg.prompts
    _require(len(p.classes) > 0, "prompts.classes", p.classes, "give at least one class, e.g. prompts.classes=[cat,dog]")
    slugs = [class_slug(c) for c in p.classes]
    _require(all(slugs), "prompts.classes", p.classes, "every class name needs at least one letter or digit")
    _require(
        len(set(slugs)) == len(slugs),
        "prompts.classes",
        p.classes,
        "class names must be distinct (ignoring case and punctuation)",
    )
    _require(p.per_class >= 1, "prompts.per_class", p.per_class, "must be at least 1")
    _require(len(p.templates) > 0, "prompts.templates", p.templates, "give at least one template")
    for key, templates in (("prompts.templates", p.templates), ("prompts.hard_templates", p.hard_templates),
                           ("prompts.vanilla_templates", p.vanilla_templates), ("prompts.hostile_templates", p.hostile_templates)):  # fmt: skip
        for t in templates:
            _require("{cls}" in t, key, t, "every template must contain {cls} so the prompt names its class")
    _require(len(p.environments) > 0, "prompts.environments", p.environments, "give at least one environment (\"\" is allowed)")
    _require(len(p.styles) > 0, "prompts.styles", p.styles, "give at least one style (\"\" is allowed)")
    _validate_prompt_mix(cfg)

    g = cfg.generate
    _require_generator("generate.generator", g.generator, "synth.testkit:ClassAwareTestGenerator")
    _require(bool(g.model.strip()), "generate.model", g.model, "give a Hugging Face model id or a local folder")
    _require(1 <= g.steps <= 1000, "generate.steps", g.steps, "must be in [1, 1000]")
    _require(0.0 <= g.guidance_scale <= 50.0, "generate.guidance_scale", g.guidance_scale, "must be in [0, 50]")
    for key, v in (("generate.height", g.height), ("generate.width", g.width)):
        _require(8 <= v <= 4096 and v % 8 == 0, key, v, "must be a multiple of 8 in [8, 4096]")
    _require(4 <= g.image_size <= 4096, "generate.image_size", g.image_size, "must be in [4, 4096]")
    _require(g.dtype in DTYPES, "generate.dtype", g.dtype, f"choose one of {', '.join(DTYPES)}")
    _require(g.batch_size >= 1, "generate.batch_size", g.batch_size, "must be at least 1")
    _require(g.num_actors >= 1, "generate.num_actors", g.num_actors, "must be at least 1")
    _require(
        g.num_gpus_per_actor is None or 0.0 <= g.num_gpus_per_actor <= 8.0,
        "generate.num_gpus_per_actor",
        g.num_gpus_per_actor,
        "must be in [0, 8], or null to use 1 when the cluster has GPUs and 0 otherwise",
    )
    _require(1 <= g.shard_size <= 100_000, "generate.shard_size", g.shard_size, "must be in [1, 100000]")
    _validate_generate_speed(g)
    _validate_derive(cfg)
    _validate_curate(cfg)
    _validate_dataset(cfg)

    t = cfg.train
    train_domains, test_domains = ("real", "synthetic", "mixture"), TEST_DOMAINS
    _require(
        len(t.experiments) > 0 and len(set(t.experiments)) == len(t.experiments) and set(t.experiments) <= set(train_domains),
        "train.experiments",
        t.experiments,
        f"give distinct training domains from {list(train_domains)}, e.g. train.experiments=[real,synthetic]",
    )
    _require(
        len(t.test_domains) > 0 and len(set(t.test_domains)) == len(t.test_domains) and set(t.test_domains) <= set(test_domains),
        "train.test_domains",
        t.test_domains,
        f"give distinct test domains from {list(test_domains)}, e.g. train.test_domains=[real]",
    )
    _validate_ablation(t.ablation)
    _require(
        len(t.seeds) > 0 and len(set(t.seeds)) == len(t.seeds) and all(0 <= s < 2**31 for s in t.seeds),
        "train.seeds",
        t.seeds,
        "give distinct non-negative integers, e.g. train.seeds=[0,1,2]",
    )
    _require(
        0.0 <= t.mixture_synthetic_fraction <= 1.0,
        "train.mixture_synthetic_fraction",
        t.mixture_synthetic_fraction,
        "must be in [0, 1] (0: all real, 1: all synthetic)",
    )
    _require(1 <= t.num_workers <= 1024, "train.num_workers", t.num_workers, "must be in [1, 1024]")
    _require(0.0 < t.cpus_per_worker <= 1024, "train.cpus_per_worker", t.cpus_per_worker, "must be in (0, 1024]")
    _require(0 <= t.max_failures <= 100, "train.max_failures", t.max_failures, "must be in [0, 100]")
    _require(1 / 64 <= t.width <= 8.0, "train.width", t.width, "must be in [1/64, 8] (1.0 is airbench94's 64/256/256 channels)")
    _require(1 <= t.batch_size <= 65536, "train.batch_size", t.batch_size, "must be in [1, 65536]")
    _require(
        t.batch_size % t.num_workers == 0,
        "train.batch_size",
        t.batch_size,
        f"must be divisible by train.num_workers={t.num_workers} (it is the global batch, split evenly)",
    )
    _require(1 <= t.steps <= 10_000_000, "train.steps", t.steps, "must be at least 1 optimizer step")
    _require(0.0 < t.lr <= 100.0, "train.lr", t.lr, "must be in (0, 100]; 1.5 per 1024 images is airbench94's")
    _require(0.0 <= t.momentum < 1.0, "train.momentum", t.momentum, "must be in [0, 1)")
    _require(0.0 <= t.weight_decay <= 1.0, "train.weight_decay", t.weight_decay, "must be in [0, 1]")
    _require(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)")
    _require(0.0 <= t.warmup_fraction < 1.0, "train.warmup_fraction", t.warmup_fraction, "must be in [0, 1)")
    _require(0 <= t.translate <= 8, "train.translate", t.translate, "must be in [0, 8] pixels (0 turns random crops off)")
    _require(t.precision in PRECISIONS, "train.precision", t.precision, f"choose one of {', '.join(PRECISIONS)}")
    _require(t.tta_level in (0, 1, 2), "train.tta_level", t.tta_level, "choose 0 (none), 1 (mirror) or 2 (mirror + shifts)")
    _require(1 <= t.eval_batch_size <= 65536, "train.eval_batch_size", t.eval_batch_size, "must be in [1, 65536]")
    _require(
        t.epoch_val_images is None or t.epoch_val_images >= 1,
        "train.epoch_val_images",
        t.epoch_val_images,
        "must be at least 1, or null to validate on the whole split after each epoch",
    )
    _validate_tune(cfg)
    _validate_export(cfg)
    _validate_web(cfg.web)


ATTENTIONS = ("sdpa", "classic")


def _validate_generate_speed(g: GenerateConfig) -> None:
    """The generate stage's speed switches and actor pool (see GenerateConfig)."""
    _require(g.decoder is None or bool(g.decoder.strip()), "generate.decoder", g.decoder,
             "give an AutoencoderTiny id or folder (e.g. madebyollin/taesd), or null for the pipeline's VAE")  # fmt: skip
    _require(0 <= g.prompt_cache <= 1_000_000, "generate.prompt_cache", g.prompt_cache,
             "give the number of prompt embeddings an actor keeps, in [0, 1000000] (0: no cache)")  # fmt: skip
    _require(g.attention in ATTENTIONS, "generate.attention", g.attention, f"choose one of {', '.join(ATTENTIONS)}")
    _require(not (g.fuse_qkv and g.attention != "sdpa"), "generate.fuse_qkv", g.fuse_qkv,
             "fused projections run through sdpa attention: set generate.attention=sdpa or generate.fuse_qkv=false")  # fmt: skip
    _require(g.max_actors is None or g.max_actors >= g.num_actors, "generate.max_actors", g.max_actors,
             f"must be at least generate.num_actors={g.num_actors} (the pool autoscales between them), or null for a fixed pool")  # fmt: skip
    _require(g.cpus_per_actor is None or 0.0 < g.cpus_per_actor <= 1024, "generate.cpus_per_actor", g.cpus_per_actor,
             "must be in (0, 1024], or null for 1 on a CPU actor and 0.5 beside a GPU")  # fmt: skip
    _require(g.writer_concurrency is None or g.writer_concurrency >= 1, "generate.writer_concurrency", g.writer_concurrency,
             "must be at least 1, or null to let Ray Data schedule the writers")  # fmt: skip


def _validate_prompt_mix(cfg: Config) -> None:
    """prompts.techniques, and the knobs of each technique in use; hostile examples; the guidance range."""
    p = cfg.prompts
    mix = {t: getattr(p.techniques, t) for t in PROMPT_TECHNIQUES}
    example = "prompts.techniques.environment=0.7 prompts.techniques.llm=0"
    for t, share in mix.items():
        _require(share >= 0.0, f"prompts.techniques.{t}", share, f"shares must be >= 0 (0 turns {t} off)")
    total = sum(mix.values())
    _require(
        abs(total - 1.0) <= 1e-6,
        "prompts.techniques",
        mix,
        f"the shares sum to {total:g}, not 1; set all five so they sum to 1, e.g. {example}",
    )
    in_use = {t for t, share in mix.items() if share > 0}
    for t, key, items in (("vanilla", "prompts.vanilla_templates", p.vanilla_templates), ("domain", "prompts.domains", p.domains),
                          ("hard", "prompts.hard_templates", p.hard_templates)):  # fmt: skip
        _require(t not in in_use or len(items) > 0, key, items, f"give at least one, or set prompts.techniques.{t}=0")
    _require(
        "{cls}" in p.domain_template and "{domain}" in p.domain_template,
        "prompts.domain_template",
        p.domain_template,
        "must contain {domain} and {cls}, e.g. 'a {domain} of a {cls}'",
    )
    m = p.llm
    if "llm" in in_use:
        _require(m.per_class >= 1, "prompts.llm.per_class", m.per_class, "must be at least 1, or set prompts.techniques.llm=0")
    _require(bool(m.model.strip()), "prompts.llm.model", m.model, "give a Hugging Face id or a local folder of a causal language model")
    _require(0 <= m.seed < 2**63, "prompts.llm.seed", m.seed, "must be a non-negative integer")
    _require(1 <= m.max_new_tokens <= 512, "prompts.llm.max_new_tokens", m.max_new_tokens, "must be in [1, 512]")
    _require(0.0 < m.temperature <= 10.0, "prompts.llm.temperature", m.temperature, "must be in (0, 10]")
    _require(0.0 < m.top_p <= 1.0, "prompts.llm.top_p", m.top_p, "must be in (0, 1]")
    _require(1 <= m.attempts <= 100, "prompts.llm.attempts", m.attempts, "must be in [1, 100]")
    _require(
        "{cls}" in m.template and "{text}" in m.template, "prompts.llm.template", m.template, "must contain {cls} and {text}"
    )
    _require(m.tokenizer is None or bool(m.tokenizer.strip()), "prompts.llm.tokenizer", m.tokenizer, "give a folder or id, or null")
    _require(
        p.hostile_per_class >= 0, "prompts.hostile_per_class", p.hostile_per_class, "must be >= 0 (0: no hostile examples)"
    )
    if p.hostile_per_class > 0:
        for key, items in (("prompts.hostile_templates", p.hostile_templates), ("prompts.hostile_objects", p.hostile_objects)):
            _require(len(items) > 0, key, items, "give at least one, or set prompts.hostile_per_class=0")
    for t in p.hostile_templates:
        _require("{object}" in t, "prompts.hostile_templates", t, "every hostile template must contain {object} and {cls}")
    r = p.guidance_scale_range
    _require(
        r is None or (len(r) == 2 and 0.0 <= r[0] <= r[1] <= 50.0),
        "prompts.guidance_scale_range",
        r,
        "give [low, high] with 0 <= low <= high <= 50, e.g. [1.0,7.5], or null to use generate.guidance_scale",
    )


VARIATION_METHODS = ("img2img", "embedding")


def derive_enabled(d: DeriveConfig) -> bool:
    """Whether the config asks the derive stage for any image."""
    return d.variations.count > 0 or d.fusion.per_class > 0 or d.inpainting.count > 0


def _validate_derive(cfg: Config) -> None:
    # Whether the models support the techniques asked for is checked when the stage starts
    # (synth.diffusion.check_models reads their model_index.json), before Ray starts.
    d = cfg.derive
    _require_generator("derive.generator", d.generator, "synth.testkit:ClassAwareTestDeriver")
    _require(bool(d.model.strip()), "derive.model", d.model, "give a Hugging Face model id or a local folder")
    _require(d.prior is None or bool(d.prior.strip()), "derive.prior", d.prior, "give a model id or folder, or null")
    _require(bool(d.parents.strip()), "derive.parents", d.parents, "give generate or a folder <folder>/<class>/*.png (local or s3://)")
    _require(
        d.parents != "generate" or cfg.generate.enabled or not derive_enabled(d),
        "derive.parents",
        d.parents,
        "the generate stage is off (generate.enabled=false), so there are no generated parents; give a folder of "
        "your own photos (derive.parents=<folder>) or set generate.enabled=true",
    )
    _require(
        d.parents_per_class is None or d.parents_per_class >= 1,
        "derive.parents_per_class",
        d.parents_per_class,
        "must be at least 1, or null for every parent",
    )
    _require("{cls}" in d.prompt, "derive.prompt", d.prompt, "must contain {cls} so the prompt names its class")
    v = d.variations
    _require(v.count >= 0, "derive.variations.count", v.count, "must be at least 1 to make variations, or 0 for none")
    _require(v.method in VARIATION_METHODS, "derive.variations.method", v.method, f"choose one of {', '.join(VARIATION_METHODS)}")
    _require(0.0 < v.strength <= 1.0, "derive.variations.strength", v.strength, "must be in (0, 1] (0.5 keeps the parent's layout)")
    _require(1 <= v.steps <= 1000, "derive.variations.steps", v.steps, "must be in [1, 1000]")
    _require(
        v.method != "img2img" or v.steps * v.strength >= 1.0,
        "derive.variations.steps",
        v.steps,
        f"steps x strength must reach one denoising step (strength {v.strength}); raise steps or strength",
    )
    f = d.fusion
    _require(f.per_class >= 0, "derive.fusion.per_class", f.per_class, "must be at least 1 to fuse, or 0 for none")
    _require(
        len(f.weight_range) == 2 and 0.0 <= f.weight_range[0] <= f.weight_range[1] <= 1.0,
        "derive.fusion.weight_range",
        f.weight_range,
        "give [low, high] with 0 <= low <= high <= 1, e.g. [0.3,0.7]",
    )
    ip = d.inpainting
    _require(ip.count >= 0, "derive.inpainting.count", ip.count, "must be at least 1 to inpaint, or 0 for none")
    _require(
        len(ip.masks) > 0 and set(ip.masks) <= set(MASKS),
        "derive.inpainting.masks",
        ip.masks,
        f"give masks from {list(MASKS)}, e.g. derive.inpainting.masks=[border,box]",
    )
    _require("{cls}" in ip.template, "derive.inpainting.template", ip.template, "must contain {cls} (and may use {env})")
    _require(len(ip.environments) > 0, "derive.inpainting.environments", ip.environments, "give at least one (\"\" is allowed)")
    _require(0.0 < ip.strength <= 1.0, "derive.inpainting.strength", ip.strength, "must be in (0, 1]")
    _require(1 <= ip.steps <= 1000, "derive.inpainting.steps", ip.steps, "must be in [1, 1000]")
    _require(
        ip.steps * ip.strength >= 1.0,
        "derive.inpainting.steps",
        ip.steps,
        f"steps x strength must reach one denoising step (strength {ip.strength}); raise steps or strength",
    )
    _require(ip.model is None or bool(ip.model.strip()), "derive.inpainting.model", ip.model, "give a model id or folder, or null")


def _validate_curate(cfg: Config) -> None:
    # Whether the CLIP model loads is checked when the curate stage starts, before Ray starts.
    c = cfg.curate
    _require(
        c.scorer == "clip" or bool(GENERATOR_PATH.match(c.scorer)),
        "curate.scorer",
        c.scorer,
        "choose clip or give a class as package.module:ClassName (e.g. synth.testkit:ColourTestScorer)",
    )
    _require(bool(c.model.strip()), "curate.model", c.model, "give a Hugging Face id or a local folder written by save_pretrained")
    _require("{cls}" in c.prompt, "curate.prompt", c.prompt, "must contain {cls}, e.g. 'a photo of a {cls}'")
    _require(c.num_actors >= 1, "curate.num_actors", c.num_actors, "must be at least 1")
    _require(
        c.num_gpus_per_actor is None or 0.0 <= c.num_gpus_per_actor <= 8.0,
        "curate.num_gpus_per_actor",
        c.num_gpus_per_actor,
        "must be in [0, 8], or null to use 1 when the cluster has GPUs and 0 otherwise",
    )
    _require(1 <= c.batch_size <= 65536, "curate.batch_size", c.batch_size, "must be in [1, 65536]")
    _require(1 <= c.shard_size <= 100_000, "curate.shard_size", c.shard_size, "must be in [1, 100000]")
    _require(
        c.min_similarity is None or -1.0 <= c.min_similarity <= 1.0,
        "curate.min_similarity",
        c.min_similarity,
        "must be a cosine in [-1, 1], or null for no similarity floor",
    )
    _require(
        c.min_probability is None or 0.0 <= c.min_probability <= 1.0,
        "curate.min_probability",
        c.min_probability,
        "must be in [0, 1], or null for no probability floor",
    )
    _require(
        c.dedup_cosine is None or 0.0 < c.dedup_cosine <= 1.0,
        "curate.dedup_cosine",
        c.dedup_cosine,
        "must be in (0, 1] (e.g. 0.95), or null to keep near-duplicates",
    )
    for key, value in (("curate.top_per_class", c.top_per_class), ("curate.min_per_class", c.min_per_class)):
        _require(value is None or value >= 1, key, value, "must be at least 1, or null for no quota")
    _require(
        c.top_per_class is None or c.min_per_class is None or c.min_per_class <= c.top_per_class,
        "curate.min_per_class",
        c.min_per_class,
        f"must not exceed curate.top_per_class={c.top_per_class} (keep at least M and at most N needs M <= N)",
    )


REAL_SOURCES = ("cifar10", "folder")
DATASET_DOMAINS = ("real", "synthetic")
# How a synthetic image was made: text-to-image (the generate stage), then from parent images (derive).
DERIVE_TECHNIQUES = ("variation", "fusion", "inpainting")
# The per-class prompt mix (prompts.techniques), then hostile examples (NOT the class they imitate:
# evaluation only, never trained on), then the derived techniques.
PROMPT_TECHNIQUES = ("vanilla", "environment", "domain", "hard", "llm")
# Hostile examples (a class's look on the wrong object) are not their class: never training
# images of it; they make the test-only ADVERSARIAL domain, where a model's accuracy is its fooling rate.
HOSTILE = "hostile"
ADVERSARIAL = "adversarial"
TECHNIQUES = (*PROMPT_TECHNIQUES, HOSTILE, *DERIVE_TECHNIQUES)
TRAIN_TECHNIQUES = tuple(t for t in TECHNIQUES if t != HOSTILE)


def _validate_dataset(cfg: Config) -> None:
    # Whether the real data exists is checked by the dataset stage, not here: other stages
    # (prompts, generate) run with the same config and must not need it.
    d = cfg.dataset
    _require(d.real_source in REAL_SOURCES, "dataset.real_source", d.real_source, f"choose one of {', '.join(REAL_SOURCES)}")
    _require(
        d.real_path is None or bool(d.real_path.strip()),
        "dataset.real_path",
        d.real_path,
        "give a local path or s3:// URI, or leave it unset (null)",
    )
    _require(bool(d.download_dir.strip()), "dataset.download_dir", d.download_dir, "give a local folder")
    _require(
        d.synthetic_train_per_class >= 1,
        "dataset.synthetic_train_per_class",
        d.synthetic_train_per_class,
        "must be at least 1",
    )
    _require(
        d.synthetic_test_per_class >= 1, "dataset.synthetic_test_per_class", d.synthetic_test_per_class, "must be at least 1"
    )
    _require(0.0 <= d.val_fraction <= 0.5, "dataset.val_fraction", d.val_fraction, "must be in [0, 0.5]")
    _require(d.seed >= 0, "dataset.seed", d.seed, "must be a non-negative integer")
    _require(4 <= d.image_size <= 1024, "dataset.image_size", d.image_size, "must be in [4, 1024]")
    _require(
        len(d.domains) > 0 and len(set(d.domains)) == len(d.domains) and set(d.domains) <= set(DATASET_DOMAINS),
        "dataset.domains",
        d.domains,
        f"give distinct domains from {list(DATASET_DOMAINS)}, e.g. dataset.domains=[real]",
    )
    _require(
        d.synthetic_source in SYNTHETIC_SOURCES,
        "dataset.synthetic_source",
        d.synthetic_source,
        f"choose one of {', '.join(SYNTHETIC_SOURCES)} (curated needs the curate stage's verdicts)",
    )
    _require(
        d.hostile in HOSTILE_MODES,
        "dataset.hostile",
        d.hostile,
        "choose evaluate (hostile examples only measure the fooling rate) or other_class (they also train a class "
        f"{OTHER_CLASS!r})",
    )
    if d.hostile == "other_class":
        p = cfg.prompts
        _require(
            OTHER_CLASS not in [class_slug(c) for c in p.classes],
            "prompts.classes",
            p.classes,
            f"dataset.hostile=other_class adds the class {OTHER_CLASS!r} for hostile examples; rename your class "
            f"{OTHER_CLASS!r}, or use dataset.hostile=evaluate",
        )
        _require(
            p.hostile_per_class >= 1,
            "prompts.hostile_per_class",
            p.hostile_per_class,
            f"dataset.hostile=other_class trains the class {OTHER_CLASS!r} on hostile examples, so make some "
            "(e.g. prompts.hostile_per_class=50), or use dataset.hostile=evaluate",
        )
    _require(
        d.techniques is None
        or (len(d.techniques) > 0 and len(set(d.techniques)) == len(d.techniques) and set(d.techniques) <= set(TRAIN_TECHNIQUES)),
        "dataset.techniques",
        d.techniques,
        f"give distinct techniques from {list(TRAIN_TECHNIQUES)}, e.g. dataset.techniques=[environment,variation], "
        "or null for every technique",
    )


SYNTHETIC_SOURCES = ("auto", "all", "curated")


def choose_synthetic_source(setting: str, judged: bool) -> Optional[str]:
    """``dataset.synthetic_source`` as the readers of the synthetic domain apply it, given whether the
    curate stage has judged the images: "all" or "curated"; None when curated is asked for and
    nothing is judged (each caller names its own fix)."""
    if setting == "all":
        return "all"
    if judged:
        return "curated"
    return None if setting == "curated" else "all"
# Test domains: adversarial (hostile images) is skipped with a warning when a run made none.
TEST_DOMAINS = ("real", "synthetic", "mixture", ADVERSARIAL)


def _validate_ablation(a: TrainAblationConfig) -> None:
    _require(
        a.techniques is None
        or a.techniques == ["all"]
        or (len(a.techniques) > 0 and len(set(a.techniques)) == len(a.techniques) and set(a.techniques) <= set(TRAIN_TECHNIQUES)),
        "train.ablation.techniques",
        a.techniques,
        f"give [all], distinct techniques from {list(TRAIN_TECHNIQUES)} (e.g. train.ablation.techniques=[vanilla,domain]), "
        "or null for no technique cells",
    )
    _require(
        a.images_per_class is None or a.images_per_class >= 1,
        "train.ablation.images_per_class",
        a.images_per_class,
        "must be at least 1, or null for the smallest per-class count of the compared sets",
    )


TUNE_MODES = ("fixed_budget", "augment")


def _validate_tune(cfg: Config) -> None:
    # Everything a sweep needs from the config is checked here, before Ray or any trial starts;
    # whether the dataset holds enough images for the largest ratio is checked by the tune stage.
    u = cfg.tune
    _require(
        len(u.ratios) > 0,
        "tune.ratios",
        u.ratios,
        "give at least one synthetic fraction in [0, 1], e.g. tune.ratios=[0,0.5,1]",
    )
    for r in u.ratios:
        _require(0.0 <= r <= 1.0, "tune.ratios", u.ratios, f"{r} is outside [0, 1]; every ratio is a synthetic fraction")
    _require(
        len({round(r, 6) for r in u.ratios}) == len(u.ratios),
        "tune.ratios",
        u.ratios,
        "give distinct ratios (each ratio x seed is one trial)",
    )
    _require(
        len(u.seeds) > 0 and len(set(u.seeds)) == len(u.seeds) and all(0 <= s < 2**31 for s in u.seeds),
        "tune.seeds",
        u.seeds,
        "give distinct non-negative integers, e.g. tune.seeds=[0,1,2]",
    )
    _require(u.mode in TUNE_MODES, "tune.mode", u.mode, f"choose one of {', '.join(TUNE_MODES)}")
    _require(
        u.asha_grace_steps is None or 1 <= u.asha_grace_steps <= cfg.train.steps,
        "tune.asha_grace_steps",
        u.asha_grace_steps,
        f"must be in [1, train.steps={cfg.train.steps}], or null for a quarter of train.steps",
    )
    _require(
        u.asha_reduction_factor > 1.0,
        "tune.asha_reduction_factor",
        u.asha_reduction_factor,
        "must be above 1 (3 keeps a third of the trials at each rung)",
    )
    _require(0.0 < u.cpus_per_trial <= 1024, "tune.cpus_per_trial", u.cpus_per_trial, "must be in (0, 1024]")
    _require(
        u.gpus_per_trial is None or 0.0 <= u.gpus_per_trial <= 8.0,
        "tune.gpus_per_trial",
        u.gpus_per_trial,
        "must be in [0, 8], or null to use 1 when the cluster has GPUs and 0 otherwise",
    )
    _require(
        u.max_concurrent_trials is None or u.max_concurrent_trials >= 1,
        "tune.max_concurrent_trials",
        u.max_concurrent_trials,
        "must be at least 1, or null to fit as many trials as the cluster's resources allow",
    )
    _require(0 <= u.max_failures <= 100, "tune.max_failures", u.max_failures, "must be in [0, 100]")


EXPORT_FORMATS = ("imagefolder", "huggingface", "webdataset")
EXPORT_CURATION = ("all", "accepted")


def _validate_web(w: WebConfig) -> None:
    _require(1 <= w.queue_size <= 1024, "web.queue_size", w.queue_size, "must be in [1, 1024]")
    _require(0 < w.generate_timeout_s <= 3600, "web.generate_timeout_s", w.generate_timeout_s, "give (0, 3600] seconds")
    _require(1024 <= w.max_upload_bytes <= 1 << 30, "web.max_upload_bytes", w.max_upload_bytes, "must be in [1024, 2**30]")
    _require(32 <= w.max_image_side <= 65535, "web.max_image_side", w.max_image_side, "must be in [32, 65535]")
    _require(1024 <= w.max_image_pixels <= 1 << 30, "web.max_image_pixels", w.max_image_pixels, "must be in [1024, 2**30]")
    _require(1 <= w.page_size <= 500, "web.page_size", w.page_size, "must be in [1, 500]")


def _validate_export(cfg: Config) -> None:
    e = cfg.export
    _require(
        len(e.formats) > 0 and len(set(e.formats)) == len(e.formats) and set(e.formats) <= set(EXPORT_FORMATS),
        "export.formats",
        e.formats,
        f"give distinct formats from {list(EXPORT_FORMATS)}, e.g. export.formats=[imagefolder,huggingface]",
    )
    _require(
        e.dest is None or (bool(e.dest.strip()) and (not e.dest.startswith("s3://") or bool(e.dest[5:].partition("/")[0]))),
        "export.dest",
        e.dest,
        "give a local folder or s3://bucket/prefix, or null for <storage.root>/<run>/export",
    )
    _require(
        e.techniques is None
        or (len(e.techniques) > 0 and len(set(e.techniques)) == len(e.techniques) and all(re.fullmatch(r"[\w-]+", t) for t in e.techniques)),
        "export.techniques",
        e.techniques,
        "give distinct technique names as the dataset stage recorded them, e.g. export.techniques=[template,variation], "
        "or null for every technique",
    )
    _require(e.curation in EXPORT_CURATION, "export.curation", e.curation, f"choose one of {', '.join(EXPORT_CURATION)}")
    _require(1 <= e.shard_size <= 1_000_000, "export.shard_size", e.shard_size, "must be in [1, 1000000]")
    _require(bool(re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", e.license)), "export.license", e.license,
             "give a Hugging Face Hub licence id, e.g. other, cc-by-4.0, openrail++")  # fmt: skip
    _require(e.in_process_max_images >= 0, "export.in_process_max_images", e.in_process_max_images, "must be at least 0")
    _require(1 <= e.num_workers <= 1024, "export.num_workers", e.num_workers, "must be in [1, 1024]")

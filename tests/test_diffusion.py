"""synth.diffusion on real diffusers pipelines with tiny random weights (CPU, 64x64 renders, 1-2 steps).

Random weights render noise, so these tests check what does not depend on the weights: shapes and
dtypes, that each image is a function of its own row (seed, prompt, parents) alone and not of its
batch, that seeds matter, which models the manifest records, and which model combinations
check_models refuses before Ray starts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, synth_imports
from synth.config import ConfigError, DeriveConfig, FusionConfig, GenerateConfig, InpaintingConfig, VariationsConfig, load_config

H = W = 64  # render size: the tiny models' native 64x64
SMALL = 16  # stored size


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (conftest.torch_threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd):
    from synth.testkit import build_tiny_random_kandinsky, build_tiny_random_sd_inpaint_pipeline, build_tiny_random_unclip

    root = tmp_path_factory.mktemp("diffusion-models")
    prior, decoder = build_tiny_random_kandinsky(root / "kandinsky")
    return {
        "sd": str(tiny_sd),
        "inpaint": str(build_tiny_random_sd_inpaint_pipeline(root / "sd-inpaint")),
        "prior": str(prior),
        "decoder": str(decoder),
        "unclip": str(build_tiny_random_unclip(root / "unclip")),
    }


def gen_config(**kw) -> GenerateConfig:
    base = dict(steps=1, guidance_scale=0.0, height=H, width=W, image_size=SMALL, dtype="float32", batch_size=4)
    return GenerateConfig(**{**base, **kw})


def parent_images(n: int, size: int = 48) -> dict[str, np.ndarray]:
    """Smooth, distinct parents of a size other than the render size (the deriver must fit them)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = {}
    for k in range(n):
        img = np.stack([np.sin(6 * xx + k), np.cos(4 * yy - k), np.sin(3 * (xx + yy) + 2 * k)], axis=-1)
        out[f"p{k}"] = ((img * 0.5 + 0.5) * 255).astype(np.uint8)
    return out


def assert_images(images, n: int, full: bool = False) -> None:
    assert images.small.shape == (n, SMALL, SMALL, 3) and images.small.dtype == np.uint8
    if full:
        assert images.full is not None and images.full.shape[0] == n and images.full.dtype == np.uint8
    else:
        assert images.full is None
    assert all(img.std() > 0 for img in images.small), "every image has content"


# Batched CPU kernels may round differently from single-image ones; an image counts as the same
# when no channel differs by more than this (out of 255) -- far below what another seed changes.
SAME = 2


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def check_generator_batch_independence(gen, prompts, negatives, seeds):
    """Each image of a batch equals the same row made alone; another seed gives another image."""
    batch = gen.generate(prompts, negatives, seeds)
    assert_images(batch, len(prompts), full=gen.cfg.keep_full_resolution)
    for i in (0, len(prompts) - 1):
        alone = gen.generate([prompts[i]], [negatives[i]], [seeds[i]])
        assert max_diff(alone.small[0], batch.small[i]) <= SAME
    assert max_diff(batch.small[0], batch.small[1]) > 10, "different seeds differ"
    return batch


# --------------------------------------------------------------------------------------------
# Text to image
# --------------------------------------------------------------------------------------------


def test_module_imports_only_config_and_images():
    assert synth_imports(REPO / "synth" / "diffusion.py") <= {"synth.config", "synth.images"}


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_prior_decoder_images_depend_on_their_own_row_only(models, guidance):
    from synth.diffusion import DiffusersGenerator

    cfg = gen_config(model=models["decoder"], prior=models["prior"], guidance_scale=guidance, keep_full_resolution=True)
    assert DiffusersGenerator.model_name(cfg) == f"{models['prior']} -> {models['decoder']}"
    gen = DiffusersGenerator(cfg, ["cat", "dog"])
    assert gen.kind == "prior"
    prompts = ["a photo of a cat", "a photo of a dog", "a cat on a hill"]
    batch = check_generator_batch_independence(gen, prompts, ["blurry", "text", "blurry"], [11, 12, 13])
    assert batch.full.shape == (3, H, W, 3)
    # The same seed with another prompt: the prior conditions on the text.
    other = gen.generate(["a photo of a dog"], ["blurry"], [11])
    assert max_diff(other.small[0], batch.small[0]) > 0


def test_unclip_images_depend_on_their_own_row_only(models):
    from synth.diffusion import DiffusersGenerator

    cfg = gen_config(model=models["unclip"], guidance_scale=2.0)
    assert DiffusersGenerator.model_name(cfg) == models["unclip"]
    gen = DiffusersGenerator(cfg, ["cat", "dog"])
    assert gen.kind == "unclip"
    check_generator_batch_independence(gen, ["a cat", "a dog", "a bird"], ["", "", ""], [5, 6, 7])


def test_per_image_guidance_groups_rows_and_keeps_null_rows_as_before(models):
    """One pipeline call per guidance value, images back in row order; null rows are made exactly as today."""
    from synth.diffusion import DiffusersGenerator

    gen = DiffusersGenerator(gen_config(model=models["sd"], guidance_scale=0.0), ["cat", "dog"])
    prompts, negatives, seeds = ["a cat", "a dog", "a cat", "a dog"], ["blurry"] * 4, [1, 2, 3, 4]
    today = gen.generate(prompts, negatives, seeds)
    assert np.array_equal(gen.generate(prompts, negatives, seeds, guidance_scales=[None] * 4).small, today.small)
    calls = []
    pipe = gen.pipe
    gen.pipe = lambda **kw: calls.append((len(kw["prompt_embeds"]), kw["guidance_scale"])) or pipe(**kw)  # prompt_cache on
    mixed = gen.generate(prompts, negatives, seeds, guidance_scales=[None, 3.0, None, 3.0])
    assert sorted(calls) == [(2, 0.0), (2, 3.0)]
    gen.pipe = pipe
    # The null rows: byte-identical to the same rows made today, without per-image guidance.
    nulls = gen.generate([prompts[0], prompts[2]], negatives[:2], [1, 3])
    assert np.array_equal(mixed.small[[0, 2]], nulls.small)
    # The guided rows: those of a generator whose generate.guidance_scale is 3.0, in their places.
    guided = DiffusersGenerator(gen_config(model=models["sd"], guidance_scale=3.0), ["cat", "dog"])
    assert np.array_equal(mixed.small[[1, 3]], guided.generate([prompts[1], prompts[3]], negatives[:2], [2, 4]).small)
    assert max_diff(mixed.small[1], today.small[1]) > 0, "guidance changes the image"


def test_stable_diffusion_still_goes_through_text_to_image(models):
    from synth.diffusion import DiffusersGenerator

    gen = DiffusersGenerator(gen_config(model=models["sd"]), ["cat"])
    assert gen.kind == "text2img"
    check_generator_batch_independence(gen, ["a cat", "a cat", "a dog"], ["", "", ""], [1, 2, 3])


# --------------------------------------------------------------------------------------------
# Speed switches: decoder, prompt embeddings, fused projections, attention, layout, compile
# --------------------------------------------------------------------------------------------

# Every switch off: the pipeline called with its prompts, as before the switches existed.
PLAIN = dict(prompt_cache=0, fuse_qkv=False)
# Templates repeat: rows 0 and 2 share a prompt and a negative.
ROWS = (["a photo of a cat", "a dog on a hill", "a photo of a cat", "a frog"], ["blurry", "text", "blurry", "blurry"], [1, 2, 3, 4])


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    from synth.testkit import build_tiny_random_autoencoder_tiny

    return str(build_tiny_random_autoencoder_tiny(tmp_path_factory.mktemp("taesd") / "taesd"))


def check_switch(gen, plain_small=None):
    """Valid images, each a function of its own row: alone, in a batch or in another batch order, the same
    (within rounding); another seed, another image. Returns the batch's images."""
    prompts, negatives, seeds = ROWS
    batch = check_generator_batch_independence(gen, prompts, negatives, seeds)
    again = gen.generate(prompts[::-1], negatives[::-1], seeds[::-1])
    assert max_diff(again.small[::-1], batch.small) <= SAME, "deterministic per seed, whatever the batch order"
    if plain_small is not None:
        assert max_diff(batch.small, plain_small) <= SAME, "a speed switch only rounds differently"
    return batch


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_defaults_make_the_plain_pipelines_bytes(models, guidance):
    """The default-on switches (prompt cache, fused QKV projections) change no byte, small or full."""
    from synth.diffusion import DiffusersGenerator

    kw = dict(model=models["sd"], guidance_scale=guidance, keep_full_resolution=True)
    plain = DiffusersGenerator(gen_config(**kw, **PLAIN), ["cat"])
    fast = DiffusersGenerator(gen_config(**kw), ["cat"])
    assert fast.embeddings is not None and plain.embeddings is None
    for rows in (ROWS, ([ROWS[0][1]], [ROWS[1][1]], [7])):  # a batch with a repeated prompt, then a row alone
        a, b = plain.generate(*rows), fast.generate(*rows)
        assert np.array_equal(a.small, b.small) and np.array_equal(a.full, b.full)
    assert_images(b, 1, full=True)


def test_prompt_embeddings_are_encoded_once_and_reused_across_batches(models):
    from synth.diffusion import DiffusersGenerator

    gen = DiffusersGenerator(gen_config(model=models["sd"], guidance_scale=3.0), ["cat"])
    prompts, negatives, seeds = ROWS
    first = gen.generate(prompts, negatives, seeds)
    # Unique texts once: 3 prompts and 2 negatives; the repeated prompt and negatives reused.
    assert (gen.embeddings.encoded, gen.embeddings.reused) == (5, 3)
    second = gen.generate(prompts, negatives, [5, 6, 7, 8])
    assert (gen.embeddings.encoded, gen.embeddings.reused) == (5, 11), "a later batch encodes nothing"
    assert max_diff(first.small, second.small) > 10, "new seeds, new images"
    # A cache too small for one batch drops the oldest texts and still makes the same bytes.
    small = DiffusersGenerator(gen_config(model=models["sd"], guidance_scale=3.0, prompt_cache=2), ["cat"])
    for _ in range(2):
        assert np.array_equal(small.generate(prompts, negatives, seeds).small, first.small)
        assert len(small.embeddings.cache) == 2


@pytest.mark.parametrize(
    "switch",
    [dict(channels_last=True), dict(attention="classic", fuse_qkv=False), dict(fuse_qkv=False), dict(prompt_cache=0), dict(batch_size=1)],
    ids=["channels_last", "classic-attention", "unfused", "no-prompt-cache", "batch-1"],
)
def test_each_speed_switch_makes_valid_deterministic_images(models, switch):
    from synth.diffusion import DiffusersGenerator

    plain = DiffusersGenerator(gen_config(model=models["sd"], **PLAIN), ["cat"]).generate(*ROWS)
    check_switch(DiffusersGenerator(gen_config(model=models["sd"], **switch), ["cat"]), plain.small)


def test_tiny_decoder_replaces_the_vae(models, taesd):
    from diffusers import AutoencoderTiny

    from synth.diffusion import DiffusersGenerator

    plain = DiffusersGenerator(gen_config(model=models["sd"]), ["cat"]).generate(*ROWS)
    gen = DiffusersGenerator(gen_config(model=models["sd"], decoder=taesd, keep_full_resolution=True, channels_last=True), ["cat"])
    assert isinstance(gen.pipe.vae, AutoencoderTiny)
    batch = check_switch(gen)
    assert batch.full.shape == (4, H, W, 3)
    assert max_diff(batch.small, plain.small) > 10, "another decoder, other pixels"


def test_compiled_unet_and_decoder_make_the_same_images(models, monkeypatch):
    """The compile switch's graphs, captured whole (fullgraph) and run through aot_eager: the
    plumbing in seconds; the real compiler (inductor, minutes on a CPU) is the slow test below."""
    import functools

    import torch

    from synth.diffusion import DiffusersGenerator

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    rows = tuple(r[:2] for r in ROWS)
    plain = DiffusersGenerator(gen_config(model=models["sd"]), ["cat"]).generate(*rows)
    gen = DiffusersGenerator(gen_config(model=models["sd"], compile=True), ["cat"])
    assert np.array_equal(gen.generate(*rows).small, plain.small)
    assert np.array_equal(gen.generate(*rows).small, plain.small)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="inductor takes minutes on a CPU (128 s here); the "
                    "aot_eager test above covers the switch, and benchmarks/bench_generate.py measures inductor")  # fmt: skip
def test_inductor_compiled_generator_makes_valid_images(models):
    from synth.diffusion import DiffusersGenerator

    plain = DiffusersGenerator(gen_config(model=models["sd"]), ["cat"]).generate(*ROWS)
    check_switch(DiffusersGenerator(gen_config(model=models["sd"], compile=True), ["cat"]), plain.small)


def test_speed_switches_leave_prior_and_unclip_models_alone(models):
    """Switches of the UNet + VAE path are ignored by the other kinds (check_models refuses a decoder)."""
    from synth.diffusion import DiffusersGenerator

    for kw in (dict(model=models["decoder"], prior=models["prior"]), dict(model=models["unclip"])):
        gen = DiffusersGenerator(gen_config(**kw, compile=True, attention="classic", fuse_qkv=False), ["cat"])
        assert gen.embeddings is None
        assert_images(gen.generate(["a cat", "a dog"], ["", ""], [1, 2]), 2)


# --------------------------------------------------------------------------------------------
# Derive
# --------------------------------------------------------------------------------------------


def row(i: int, technique: str, parents: list[str], seed: int, **params) -> dict:
    return {
        "id": f"c{i}", "label": 0, "class_name": "cat", "prompt": f"a photo of a cat {i}", "negative": "blurry",
        "seed": seed, "technique": technique, "parents": parents, "params": params,
    }  # fmt: skip


def derive_config(models, model: str, **kw) -> DeriveConfig:
    return DeriveConfig(model=model, prior=models["prior"], **kw)


def check_deriver_rows(deriver, rows, parents, gen: GenerateConfig):
    """Valid images in the rows' order; each equals its row derived alone, in any order; seeds matter."""
    batch = deriver.derive(rows, parents)
    assert_images(batch, len(rows), full=gen.keep_full_resolution)
    for i in (0, len(rows) - 1):
        alone = deriver.derive([rows[i]], parents)
        assert max_diff(alone.small[0], batch.small[i]) <= SAME, f"row {i} depends on its batch"
    reversed_batch = deriver.derive(rows[::-1], parents)
    assert max_diff(reversed_batch.small[::-1], batch.small) <= SAME, "images come back in the rows' order"
    reseeded = deriver.derive([{**rows[0], "seed": rows[0]["seed"] + 1000}], parents)
    assert max_diff(reseeded.small[0], batch.small[0]) > 10, "another seed gives another child"
    return batch


def test_img2img_variations(models):
    from synth.diffusion import DiffusersDeriver

    gen = gen_config(keep_full_resolution=True)
    cfg = derive_config(models, models["sd"], variations=VariationsConfig(count=2, method="img2img", strength=0.5, steps=2))
    assert DiffusersDeriver.model_name(cfg) == models["sd"]
    deriver = DiffusersDeriver(cfg, gen, ["cat"])
    assert deriver.img2img is not None and deriver.prior is None and deriver.inpaint is None
    parents = parent_images(3)
    params = {"method": "img2img", "strength": 0.5, "steps": 2}
    rows = [row(i, "variation", [f"p{i}"], 100 + i, **params) for i in range(3)]
    batch = check_deriver_rows(deriver, rows, parents, gen)
    assert batch.full.shape == (3, H, W, 3)
    # The parent conditions the child: the same row from another parent differs.
    other_parent = deriver.derive([{**rows[0], "parents": ["p1"]}], parents)
    assert max_diff(other_parent.small[0], batch.small[0]) > 0


def test_embedding_variations_and_fusion(models):
    from synth.diffusion import DiffusersDeriver

    gen = gen_config(guidance_scale=2.0)
    cfg = derive_config(
        models, models["decoder"], variations=VariationsConfig(count=1, method="embedding"), fusion=FusionConfig(per_class=1)
    )
    assert DiffusersDeriver.model_name(cfg) == f"{models['prior']} -> {models['decoder']}"
    deriver = DiffusersDeriver(cfg, gen, ["cat"])
    assert deriver.prior is not None and deriver.img2img is None and deriver.inpaint is None
    parents = parent_images(4)
    rows = [
        row(0, "variation", ["p0"], 7, method="embedding"),
        row(1, "fusion", ["p1", "p2"], 8, weight=0.3),
        row(2, "variation", ["p3"], 9, method="embedding"),
        row(3, "fusion", ["p0", "p3"], 10, weight=0.6),
    ]
    batch = check_deriver_rows(deriver, rows, parents, gen)
    # The parents condition the children: the same seed from another parent, or another fusion weight, differs.
    other_parent = deriver.derive([{**rows[0], "parents": ["p1"]}], parents)
    assert max_diff(other_parent.small[0], batch.small[0]) > 0
    other_weight = deriver.derive([{**rows[1], "params": {"weight": 0.9}}], parents)
    assert max_diff(other_weight.small[0], batch.small[1]) > 0


@pytest.mark.parametrize("model_key", ["inpaint", "sd"])  # a 9-channel inpainting UNet; a 4-channel one (latent blending)
def test_inpainting(models, model_key):
    from synth.diffusion import DiffusersDeriver

    gen = gen_config(keep_full_resolution=True)
    cfg = derive_config(models, models["sd"], inpainting=InpaintingConfig(count=3, model=models[model_key], steps=2))
    assert DiffusersDeriver.model_name(cfg) == models[model_key]
    deriver = DiffusersDeriver(cfg, gen, ["cat"])
    assert deriver.inpaint.unet.config.in_channels == (9 if model_key == "inpaint" else 4)
    parents = parent_images(3)
    rows = [row(i, "inpainting", [f"p{i}"], 40 + i, mask=m, strength=1.0, steps=2) for i, m in enumerate(["border", "box", "center"])]
    check_deriver_rows(deriver, rows, parents, gen)
    # Neither pipeline pastes the parent back: kept pixels go through the VAE (random here), so
    # nothing is asserted about them. What is asserted is the mask diffusers gets: white = repaint.
    from synth.diffusion import _mask_image
    from synth.images import inpaint_mask

    mask = np.asarray(_mask_image("box", H, W, 41))
    assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask == 255, inpaint_mask("box", H, W, 41))


def test_inpainting_shares_the_img2img_pipeline_when_the_model_is_the_same(models):
    from synth.diffusion import DiffusersDeriver

    cfg = derive_config(
        models, models["sd"], variations=VariationsConfig(count=1, method="img2img"), inpainting=InpaintingConfig(count=1)
    )
    assert DiffusersDeriver.model_name(cfg) == models["sd"]
    deriver = DiffusersDeriver(cfg, gen_config(), ["cat"])
    assert deriver.inpaint.unet is deriver.img2img.unet
    rows = [row(0, "inpainting", ["p0"], 1, mask="center", strength=1.0, steps=1),
            row(1, "variation", ["p1"], 2, method="img2img", strength=1.0, steps=1)]  # fmt: skip
    assert_images(deriver.derive(rows, parent_images(2)), 2)


# --------------------------------------------------------------------------------------------
# check_models
# --------------------------------------------------------------------------------------------


# The smoke preset derives a variation and an edit; each case here switches on only what it names.
NO_DERIVE = ("derive.variations.count=0", "derive.inpainting.count=0", "derive.fusion.per_class=0")


def config(tmp_path, *overrides):
    return load_config(REPO / "configs" / "smoke.yaml", [f"storage.root={tmp_path}", "run=t", *NO_DERIVE, *overrides])


def test_check_models_accepts_working_combinations(models, taesd, tmp_path):
    from synth.diffusion import check_models

    m = models
    good = [
        [f"generate.model={m['sd']}"],
        [f"generate.model={m['sd']}", f"generate.decoder={taesd}"],
        [f"generate.model={m['unclip']}"],
        [f"generate.model={m['decoder']}", f"generate.prior={m['prior']}"],
        # derive inherits generate's pair: embedding variations and fusion
        [f"generate.model={m['decoder']}", f"generate.prior={m['prior']}", "derive.variations.count=1",
         "derive.variations.method=embedding", "derive.fusion.per_class=2"],
        # a Kandinsky generate stage with Stable Diffusion derive models
        [f"generate.model={m['decoder']}", f"generate.prior={m['prior']}", f"derive.model={m['sd']}",
         "derive.variations.count=1", "derive.inpainting.count=1", f"derive.inpainting.model={m['inpaint']}"],
        [f"generate.model={m['sd']}", "derive.variations.count=1", "derive.inpainting.count=1"],
        # a derive technique off is not checked
        [f"generate.model={m['unclip']}", "derive.variations.count=0"],
        # another generator loads no model
        ["generate.generator=synth.testkit:ClassAwareTestGenerator", "generate.model=nowhere/at-all"],
    ]  # fmt: skip
    for overrides in good:
        check_models(config(tmp_path, *overrides))


@pytest.mark.parametrize(
    "overrides, message, fix",
    [
        (["generate.model={sd}", "generate.prior={prior}"], "is a prior without a decoder", "generate.model to the prior's decoder"),
        (["generate.model={prior}", "generate.prior={prior}"], "is a prior (KandinskyV22PriorPipeline), not a decoder", "set generate.prior="),
        (["generate.model={prior}"], "is a prior (KandinskyV22PriorPipeline), not a decoder", "set generate.prior="),
        (["generate.model={decoder}"], "is a decoder (KandinskyV22Pipeline) that needs a prior", "set generate.prior=<its prior>"),
        (["generate.model={decoder}", "generate.prior={sd}"], "is a StableDiffusionPipeline, not a prior pipeline", "Kandinsky 2.2 prior"),
        (["generate.model={sd}", "derive.variations.count=1", "derive.variations.method=embedding"],
         "needs a Kandinsky 2.2 prior", "set derive.prior=<prior>"),
        (["generate.model={sd}", "derive.fusion.per_class=1", "derive.prior={prior}"],
         "is a prior without a decoder: derive.model=", "set derive.model to the prior's decoder"),
        (["generate.model={decoder}", "generate.prior={prior}", "derive.variations.count=1"],
         "derive.variations.method=img2img needs an image-to-image pipeline", "use derive.variations.method=embedding"),
        (["generate.model={unclip}", "derive.variations.count=1"],
         "(UnCLIPPipeline) has none in diffusers", "set derive.model to a Stable Diffusion model"),
        (["generate.model={sd}", "derive.inpainting.count=1", "derive.inpainting.model={unclip}"],
         "derive.inpainting needs an inpainting pipeline, and derive.inpainting.model=", "set derive.inpainting.model to"),
        (["generate.model={decoder}", "generate.prior={prior}", "derive.inpainting.count=1"],
         "derive.inpainting needs an inpainting pipeline, and derive.model=", "set derive.inpainting.model to"),
        (["generate.model={sd}/unet"], "is a folder without model_index.json", "save_pretrained"),
        (["generate.model={sd}", "generate.decoder={sd}/vae"], "is not a tiny autoencoder: its config.json names AutoencoderKL", "madebyollin/taesd"),
        (["generate.model={sd}", "generate.decoder={sd}"], "is a folder without config.json", "save_pretrained"),
        (["generate.model={unclip}", "generate.decoder={sd}/vae"], "decodes with its own", "generate.decoder=null"),
        (["generate.model={decoder}", "generate.prior={prior}", "generate.decoder={sd}/vae"], "decodes with its own", "generate.decoder=null"),
        (["generate.model=./no/such/folder"], "neither an existing folder nor a Hugging Face id", "stabilityai/sd-turbo"),
    ],
)
def test_check_models_refuses_with_the_fix(models, tmp_path, monkeypatch, overrides, message, fix):
    from synth.diffusion import check_models

    cfg = config(tmp_path, *[o.format(**models) for o in overrides])
    with pytest.raises(ConfigError) as err:
        check_models(cfg)
    text = str(err.value)
    assert message in text and fix in text and "\n" not in text, text


def test_pipeline_class_name_of_an_uncached_hub_id_names_the_fix(monkeypatch, tmp_path):
    from synth.diffusion import pipeline_class_name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"derive.prior='someone/not-cached'.*HF_HUB_OFFLINE.*Fix: download it"):
        pipeline_class_name("someone/not-cached", key="derive.prior")


def test_pipeline_class_name_reads_model_index(models):
    from synth.diffusion import pipeline_class_name

    names = {k: pipeline_class_name(v) for k, v in models.items()}
    assert names == {
        "sd": "StableDiffusionPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
        "prior": "KandinskyV22PriorPipeline",
        "decoder": "KandinskyV22Pipeline",
        "unclip": "UnCLIPPipeline",
    }


@pytest.mark.parametrize(
    "command, index",
    [("tiny-sd-inpaint", "model_index.json"), ("tiny-kandinsky", "prior/model_index.json"), ("tiny-unclip", "model_index.json"),
     ("tiny-taesd", "config.json")],  # fmt: skip
)
def test_testkit_commands_write_the_tiny_models(tmp_path, capsys, command, index):
    from synth.testkit import main

    assert main([command, str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / index).read_text())["_class_name"] and "written to" in capsys.readouterr().out

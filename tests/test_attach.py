"""`DAGGuidance` / `SafetyGuidance` attached to stock diffusers pipelines, on tiny in-memory components.

Oracles: the stock pipeline itself (nothing detected, detached), diffusers' own SLD / SEGA pipelines, and
`DAGStableDiffusionPipeline`, whose DAG is checked against an independent re-implementation in test_dag_oracle.py.
"""

import numpy as np
import pytest
import torch
from conftest import get_dummy_sdxl_components, hooked_layers
from diffusers import (
    ControlNetModel,
    SemanticStableDiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionPipelineSafe,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
from test_pipeline import CONCEPT, PROMPT, concept_rows, peer, run

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.attach import DAGGuidance, SafetyGuidance

#: DAG options under which the tiny model's star rows detect something from the first guided step on
GUIDED = {"warmup_steps": 1, "unsafe_threshold": 0.8, "edit_mask_threshold": 0.5}


class Boom(Exception):
    pass


@pytest.fixture
def stock(components):
    return peer(StableDiffusionPipeline, components)


@pytest.fixture
def star(components):
    return concept_rows(components, "red star", 3)


@pytest.fixture
def silent(components):
    """Concept rows equal to the start-of-text row: a flat map, so nothing is ever detected."""
    return concept_rows(components, CONCEPT, 1).repeat(3, 1)


def final_latents(pipeline, steps=6, **kwargs):
    seen = []

    def keep(pipe, i, t, tensors):
        seen.append(tensors["latents"])
        return tensors

    run(pipeline, num_inference_steps=steps, callback_on_step_end=keep, **kwargs)
    return seen[-1]


def assert_stock_again(pipe):
    unet = pipe.unet
    assert "forward" not in unet.__dict__ and not hasattr(unet, "_dag_safety_guidance")
    assert hooked_layers(unet) == set()


class TestStableDiffusion:
    def test_nothing_detected_is_the_stock_pipeline_bit_for_bit(self, stock, silent):
        reference = run(stock, num_images_per_prompt=2)
        dag = DAGGuidance(silent, safety_concept=CONCEPT, warmup_steps=1)
        with dag.attach(stock):
            ours = run(stock, num_images_per_prompt=2)
            assert hooked_layers(stock.unet)
        assert np.array_equal(ours, reference)
        assert dag.last_output.unsafe_detected == [False, False]
        assert_stock_again(stock)
        assert np.array_equal(run(stock, num_images_per_prompt=2), reference)

    @pytest.mark.parametrize(
        "options",
        [
            {"max_edit_area": 1.0, "warmup_steps": 1},
            GUIDED,
            {**GUIDED, "guidance": "sld"},
            {**GUIDED, "guidance_form": "sega"},
            {**GUIDED, "detection": "presence", "presence_threshold": 0.05},
        ],
        ids=["paper-all", "paper-region", "sld", "sega-form", "presence"],
    )
    def test_equals_the_dag_pipeline(self, stock, components, star, options):
        pipe = peer(DAGStableDiffusionPipeline, components)
        pipe.enable_dag(star, **options)
        kwargs = {"num_inference_steps": 5, "num_images_per_prompt": 2, "return_dag_maps": True}
        reference = pipe(PROMPT, generator=torch.manual_seed(0), output_type="np", safety_concept=CONCEPT, **kwargs)
        dag = DAGGuidance(star, safety_concept=CONCEPT, **options)
        with dag.attach(stock):
            ours = run(stock, num_inference_steps=5, num_images_per_prompt=2)
        # the wrapper hands the host `[e, e]`, so the host's CFG line reproduces DAG's prediction exactly
        assert np.array_equal(ours, reference.images)
        assert not np.array_equal(ours, run(stock, num_inference_steps=5, num_images_per_prompt=2))
        assert dag.last_output.unsafe_detected == reference.unsafe_detected
        assert dag.last_output.presence_scores == reference.presence_scores
        assert torch.equal(dag.last_output.dag_maps, reference.dag_maps)

    @pytest.mark.parametrize("preset", ["medium", "max"])
    def test_sld_matches_stable_diffusion_pipeline_safe(self, stock, components, preset):
        safe = peer(StableDiffusionPipelineSafe, components)
        safe.safety_concept = CONCEPT
        seen = []
        run(safe, num_inference_steps=12, callback=lambda i, t, latents: seen.append(latents), callback_steps=1,
            **getattr(SafetyConfig, preset.upper()))  # fmt: skip
        with SafetyGuidance("sld", preset, safety_concept=CONCEPT).attach(stock):
            ours = final_latents(stock, steps=12)
        assert (ours - seen[-1]).abs().max() < 1e-6
        assert (ours - final_latents(stock, steps=12)).abs().max() > 1e-4

    def test_sega_matches_the_semantic_pipeline(self, stock, components):
        options = {"edit_guidance_scale": 7.0, "edit_warmup_steps": 2, "edit_threshold": 0.8}
        semantic = peer(SemanticStableDiffusionPipeline, components)
        concepts = [CONCEPT, "a blue circle"]
        reference = run(semantic, num_inference_steps=6, editing_prompt=concepts, reverse_editing_direction=True,
                        **options)  # fmt: skip
        with SafetyGuidance("sega", safety_concept=concepts, **options).attach(stock):
            ours = run(stock, num_inference_steps=6)
        assert np.abs(ours - reference).max() < 1e-5
        assert not np.array_equal(ours, run(stock, num_inference_steps=6))

    def test_each_call_starts_afresh(self, stock, star):
        dag = DAGGuidance(star, safety_concept=CONCEPT, **GUIDED).attach(stock)
        first, second = run(stock), run(stock)
        dag.detach()
        assert np.array_equal(first, second)
        assert dag.last_output.unsafe_detected == [True]

    @pytest.mark.parametrize("where", ["callback", "unet"])
    def test_an_exception_mid_call_detaches_with_the_context(self, stock, star, where):
        reference = run(stock)
        dag = DAGGuidance(star, safety_concept=CONCEPT, **GUIDED)
        calls = []

        def fail_in_callback(pipe, i, t, tensors):
            if i == 2:
                raise Boom
            return tensors

        def fail_in_unet(module, args):
            calls.append(1)
            if len(calls) == 3:
                raise Boom

        hook = stock.unet.register_forward_pre_hook(fail_in_unet) if where == "unet" else None
        try:
            with pytest.raises(Boom), dag.attach(stock):
                run(stock, callback_on_step_end=fail_in_callback if where == "callback" else None)
        finally:
            if hook is not None:
                hook.remove()
        assert_stock_again(stock)
        assert np.array_equal(run(stock), reference)
        # attached again, the failed call leaves nothing behind: a fresh component's result
        with dag.attach(stock):
            again = run(stock)
        with DAGGuidance(star, safety_concept=CONCEPT, **GUIDED).attach(stock):
            assert np.array_equal(again, run(stock))

    def test_an_exception_while_attached_leaves_the_next_call_fresh(self, stock, star):
        dag = DAGGuidance(star, safety_concept=CONCEPT, **GUIDED).attach(stock)

        def fail(pipe, i, t, tensors):
            raise Boom

        with pytest.raises(Boom):
            run(stock, callback_on_step_end=fail)
        after = run(stock)
        dag.detach()
        with DAGGuidance(star, safety_concept=CONCEPT, **GUIDED).attach(stock):
            assert np.array_equal(after, run(stock))

    def test_user_attention_processors_keep_running(self, stock, star, components):
        """DAG's capture reads the layers' inputs: an attention processor set by the user stays in place and
        runs (the classic `AttnProcessor` gives the same result as SDPA to float rounding)."""
        from diffusers.models.attention_processor import AttnProcessor

        pipe = peer(DAGStableDiffusionPipeline, components)
        pipe.enable_dag(star, **GUIDED)
        reference = run(pipe, safety_concept=CONCEPT)
        stock.unet.set_attn_processor(AttnProcessor())
        with DAGGuidance(star, safety_concept=CONCEPT, **GUIDED).attach(stock):
            ours = run(stock)
        assert all(isinstance(p, AttnProcessor) for p in stock.unet.attn_processors.values())
        assert np.abs(ours - reference).max() < 1e-4


class TestErrors:
    def test_attach_refusals_leave_the_pipeline_as_it_was(self, stock, star, components):
        dag = DAGGuidance(star, safety_concept=CONCEPT)
        with pytest.raises(TypeError, match="UNet2DConditionModel"):
            dag.attach(object())
        with pytest.raises(
            ValueError, match="none shipped with dag-safety .* was made for this UNet.*dag-safety optimize"
        ):
            DAGGuidance().attach(stock)
        with pytest.raises(ValueError, match="no cross-attention layer"):
            DAGGuidance(star, layer_fractions=(1.0,)).attach(stock)
        assert_stock_again(stock)
        dag.attach(stock)
        with pytest.raises(ValueError, match="already attached"):
            dag.attach(stock)
        with pytest.raises(ValueError, match="already has DAGGuidance attached"):
            SafetyGuidance("sega").attach(stock)
        dag.detach()
        dag.detach()  # twice is harmless
        assert_stock_again(stock)
        pipe = peer(DAGStableDiffusionPipeline, components)
        pipe.enable_dag(star)
        with pytest.raises(ValueError, match="disable_dag"):
            dag.attach(pipe)
        assert_stock_again(pipe)

    def test_options_are_checked_at_construction(self, star):
        with pytest.raises(ValueError, match="Unknown guidance method 'esd'"):
            DAGGuidance(star, guidance="esd")
        with pytest.raises(ValueError, match="Unknown SLD preset"):
            SafetyGuidance("sld", "ultra")
        with pytest.raises(ValueError, match="turns SLD off"):
            SafetyGuidance("sld", sld_guidance_scale=1)

    def test_no_classifier_free_guidance(self, stock, star):
        with (
            DAGGuidance(star, safety_concept=CONCEPT).attach(stock),
            pytest.raises(ValueError, match="guidance_scale > 1"),
        ):
            run(stock, guidance_scale=1.0)
        assert_stock_again(stock)

    def test_sld_takes_one_concept(self, stock):
        with (
            SafetyGuidance("sld", safety_concept=["a", "b"]).attach(stock),
            pytest.raises(ValueError, match="one safety"),
        ):
            run(stock)


def image(seed=0, size=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=generator)


class TestOtherPipelines:
    """Attached but nothing detected is the stock pipeline bit for bit; with the star rows DAG detects and guides."""

    @pytest.fixture(params=["img2img", "inpaint", "controlnet"])
    def family(self, request, components):
        name = request.param
        if name == "img2img":
            return peer(StableDiffusionImg2ImgPipeline, components), {"image": image(), "strength": 0.8}
        if name == "inpaint":
            mask = torch.zeros(1, 1, 32, 32)
            mask[..., 8:24, 8:24] = 1
            return peer(StableDiffusionInpaintPipeline, components), {"image": image(), "mask_image": mask}
        torch.manual_seed(0)
        controlnet = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(4, 8))
        pipe = peer(StableDiffusionControlNetPipeline, {**components, "controlnet": controlnet})
        return pipe, {"image": image(1)}

    def test_silent_is_stock_and_star_guides(self, family, silent, star):
        pipe, inputs = family
        reference = run(pipe, num_inference_steps=5, **inputs)
        with DAGGuidance(silent, safety_concept=CONCEPT, warmup_steps=1).attach(pipe):
            assert np.array_equal(run(pipe, num_inference_steps=5, **inputs), reference)
        dag = DAGGuidance(star, safety_concept=CONCEPT, **GUIDED)
        with dag.attach(pipe):
            guided = run(pipe, num_inference_steps=5, **inputs)
        assert dag.last_output.unsafe_detected == [True]
        assert dag.last_output.dag_maps.shape == (1, 16, 16)
        assert not np.array_equal(guided, reference)
        assert_stock_again(pipe)
        assert np.array_equal(run(pipe, num_inference_steps=5, **inputs), reference)


class TestSDXL:
    @pytest.fixture
    def sdxl(self):
        pipe = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def rows(self, pipe, text, count):
        """The first `count` rows of `text`'s SDXL context (both encoders, 64 wide)."""
        encoded = pipe.encode_prompt(
            prompt=text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return encoded[0][0, :count]

    def test_silent_is_stock_and_star_guides_with_latent_sized_maps(self, sdxl):
        def generate():
            return sdxl(PROMPT, height=32, width=32, num_inference_steps=5, generator=torch.manual_seed(0),
                        output_type="np").images  # fmt: skip

        reference = generate()
        silent = self.rows(sdxl, CONCEPT, 1).repeat(3, 1)
        with DAGGuidance(silent, safety_concept=CONCEPT, warmup_steps=1).attach(sdxl):
            assert np.array_equal(generate(), reference)
        dag = DAGGuidance(self.rows(sdxl, "red star", 3), safety_concept=CONCEPT, **GUIDED)
        with dag.attach(sdxl):
            guided = generate()
        assert dag.last_output.unsafe_detected == [True]
        assert dag.last_output.dag_maps.shape == (1, 16, 16)  # the latent's
        assert not np.array_equal(guided, reference)
        assert_stock_again(sdxl)
        assert np.array_equal(generate(), reference)

    def test_the_dag_sdxl_pipeline(self, sdxl):
        """`DAGStableDiffusionXLPipeline.from_pipe` + `enable_dag`: off is the stock pipeline bit for bit, DAG
        equals `DAGGuidance` attached to the stock one, and between calls the shared UNet is stock."""
        from dag_safety import DAGStableDiffusionXLPipeline

        def generate(pipe, **kwargs):
            return pipe(PROMPT, height=32, width=32, num_inference_steps=5, generator=torch.manual_seed(0),
                        output_type="np", **kwargs)  # fmt: skip

        pipe = DAGStableDiffusionXLPipeline.from_pipe(sdxl)
        pipe.set_progress_bar_config(disable=True)
        reference = generate(sdxl).images
        assert np.array_equal(generate(pipe).images, reference)
        star = self.rows(sdxl, "red star", 3)
        with pytest.raises(ValueError, match="needs safety guidance"):
            generate(pipe, safety_concept=CONCEPT)
        pipe.enable_dag(star, **GUIDED)
        assert pipe.dag_config.warmup_steps == 1
        output = generate(pipe, safety_concept=CONCEPT, return_dag_maps=True)
        assert_stock_again(pipe)
        with DAGGuidance(star, safety_concept=CONCEPT, **GUIDED).attach(sdxl) as dag:
            attached = generate(sdxl).images
        assert np.array_equal(output.images, attached) and not np.array_equal(attached, reference)
        assert output.unsafe_detected == dag.last_output.unsafe_detected == [True]
        assert output.dag_maps.shape == (1, 16, 16)
        with pytest.raises(ValueError, match="DAG is enabled"):
            pipe.enable_safety_guidance("sega")
        pipe.disable_dag()
        pipe.enable_safety_guidance("sega", edit_warmup_steps=1)
        assert not np.array_equal(generate(pipe, safety_concept=CONCEPT).images, reference)
        pipe.disable_safety_guidance()
        assert np.array_equal(generate(pipe).images, reference)

    def test_dag_map_is_the_map_of_the_conditional_pass(self, sdxl):
        """`DAGStableDiffusionXLPipeline.dag_map` of the last step's UNet input and the prompt (with SDXL's added
        conditioning) is the map the call returns; the negative prompt's differs."""
        from dag_safety import DAGStableDiffusionXLPipeline

        pipe = DAGStableDiffusionXLPipeline.from_pipe(sdxl)
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_dag(self.rows(sdxl, "red star", 3), warmup_steps=5)  # never guides: plain CFG's inputs
        inputs = []

        def keep(pipeline, i, t, tensors):
            inputs.append(tensors["latents"].clone())
            return tensors

        out = pipe(PROMPT, negative_prompt="a blue circle", height=32, width=32, num_inference_steps=5,
                   generator=torch.manual_seed(0), output_type="latent", return_dag_maps=True,
                   safety_concept=CONCEPT, callback_on_step_end=keep)  # fmt: skip
        last_t = pipe.scheduler.timesteps[-1]
        conditional = pipe.dag_map(inputs[-2], last_t, prompt=PROMPT)
        torch.testing.assert_close(out.dag_maps, conditional, rtol=0, atol=1e-4)  # batched vs single UNet rows
        assert (out.dag_maps - pipe.dag_map(inputs[-2], last_t, prompt="a blue circle")).abs().max() > 1e-2
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        from_embeds = pipe.dag_map(inputs[-2], last_t, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        assert torch.equal(from_embeds, conditional)
        with pytest.raises(ValueError, match="pooled_prompt_embeds"):
            pipe.dag_map(inputs[-2], last_t, prompt_embeds=embeds)

    def test_a_failed_enable_dag_keeps_the_enabled_one(self, sdxl, star):
        from dag_safety import DAGStableDiffusionXLPipeline

        pipe = DAGStableDiffusionXLPipeline.from_pipe(sdxl)
        good = self.rows(sdxl, "red star", 3)
        pipe.enable_dag(good, **GUIDED)
        before = pipe.dag_config
        with pytest.raises(ValueError, match="64"):
            pipe.enable_dag(star)
        assert pipe.dag_config is before

    @pytest.mark.parametrize("family", ["img2img", "inpaint", "controlnet"])
    def test_image_to_image_inpainting_and_controlnet(self, sdxl, family):
        """SDXL's image-to-image, inpainting and ControlNet pipelines (the same components): attached with nothing
        detected is the stock pipeline bit for bit, and the star rows guide."""
        from diffusers import (
            StableDiffusionXLControlNetPipeline,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
        )

        inputs = {"image": image(), "strength": 0.8}
        if family == "img2img":
            pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl, requires_aesthetics_score=False)
        elif family == "inpaint":
            mask = torch.zeros(1, 1, 32, 32)
            mask[..., 8:24, 8:24] = 1
            pipe = StableDiffusionXLInpaintPipeline.from_pipe(sdxl, requires_aesthetics_score=False)
            inputs["mask_image"] = mask
        else:
            torch.manual_seed(0)
            controlnet = ControlNetModel.from_unet(sdxl.unet, conditioning_embedding_out_channels=(4, 8))
            pipe = StableDiffusionXLControlNetPipeline.from_pipe(sdxl, controlnet=controlnet)
            inputs = {"image": image(1)}
        pipe.set_progress_bar_config(disable=True)

        def generate():
            return pipe(PROMPT, height=32, width=32, num_inference_steps=5, generator=torch.manual_seed(0),
                        output_type="np", **inputs).images  # fmt: skip

        reference = generate()
        silent = self.rows(sdxl, CONCEPT, 1).repeat(3, 1)
        with DAGGuidance(silent, safety_concept=CONCEPT, warmup_steps=1).attach(pipe):
            assert np.array_equal(generate(), reference)
        dag = DAGGuidance(self.rows(sdxl, "red star", 3), safety_concept=CONCEPT, **GUIDED)
        with dag.attach(pipe):
            guided = generate()
        assert dag.last_output.unsafe_detected == [True] and not np.array_equal(guided, reference)
        assert_stock_again(pipe)

    def test_an_embedding_of_the_wrong_width(self, sdxl, star):
        with pytest.raises(ValueError, match="64"):
            DAGGuidance(star).attach(sdxl)  # SD's 32-wide rows against SDXL's 64-wide context
        assert_stock_again(sdxl)


def test_exported_from_the_package():
    import dag_safety

    assert dag_safety.DAGGuidance is DAGGuidance and dag_safety.SafetyGuidance is SafetyGuidance


def test_the_readme_snippet_on_the_mini_model(mini_pipe):
    """The README's `DAGGuidance` examples, on the bundled model: text-to-image, then img2img, inpainting and
    ControlNet through `from_pipe`."""
    from diffusers import StableDiffusionPipeline

    from dag_safety.embeddings import RED_STAR

    pipe = StableDiffusionPipeline.from_pipe(mini_pipe)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, num_inference_steps=8, generator=torch.manual_seed(0), output_type="np").images
    dag = DAGGuidance(RED_STAR)
    with dag.attach(pipe):
        image = pipe(PROMPT, num_inference_steps=8, generator=torch.manual_seed(0), output_type="pil").images[0]
    assert len(dag.last_output.unsafe_detected) == 1 and dag.last_output.dag_maps.shape[0] == 1
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    with dag.attach(img2img):
        img2img("a red star on a gray background", image=image, strength=0.7, num_inference_steps=8)
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    mask = Image.new("L", image.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = StableDiffusionInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    with dag.attach(inpaint):
        inpaint("a red star on a white background", image=image, mask_image=mask, num_inference_steps=8)
    assert len(dag.last_output.unsafe_detected) == 1
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 96))
    control = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    with dag.attach(control):
        control("a red star on a white background", image=image, num_inference_steps=8)
    assert len(dag.last_output.unsafe_detected) == 1
    assert_stock_again(pipe)
    again = pipe(PROMPT, num_inference_steps=8, generator=torch.manual_seed(0), output_type="np").images
    assert np.array_equal(again, reference)


def test_without_an_embedding_the_bundled_one_for_the_model(mini_pipe):
    """`enable_dag()` and `DAGGuidance()` pick the shipped embedding whose fingerprint is the UNet's: on the mini
    model, the red star, with its saved settings."""
    from dag_safety.embeddings import RED_STAR

    mini_pipe.enable_dag()
    chosen = mini_pipe._dag
    mini_pipe.enable_dag(RED_STAR)
    explicit = mini_pipe._dag
    mini_pipe.disable_dag()
    assert chosen.config == explicit.config and chosen.safety_concepts == explicit.safety_concepts == ["a red star"]
    assert all(torch.equal(chosen.keys[0][name], explicit.keys[0][name]) for name in explicit.keys[0])
    with DAGGuidance().attach(mini_pipe) as dag:
        assert dag.config == explicit.config

"""DAGStableDiffusionPipeline against the real peers: StableDiffusionPipeline, StableDiffusionPipelineSafe and
SemanticStableDiffusionPipeline, on the same tiny seeded components."""

from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import hooked_layers
from diffusers import (
    DDIMScheduler,
    SemanticStableDiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionPipelineSafe,
)
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.detection import minmax_normalize

PROMPT = "a red star and a blue circle on a white background"
CONCEPT = "a red star"


def peer(cls, components):
    kwargs = dict(components)
    kwargs["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
    if cls is SemanticStableDiffusionPipeline:
        kwargs.pop("image_encoder")
    pipeline = cls(**kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipeline, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    return pipeline(PROMPT, generator=torch.manual_seed(seed), output_type="np", **kwargs).images


def concept_rows(components, text, rows):
    tokenizer, encoder = components["tokenizer"], components["text_encoder"]
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0][0, :rows]


@pytest.fixture
def silent_embedding(components):
    """Concept rows equal to the start-of-text row: a flat map, so nothing is ever detected."""
    sot = concept_rows(components, CONCEPT, 1)
    return sot.repeat(3, 1)


@pytest.fixture
def star_embedding(components):
    return concept_rows(components, "red star", 3)  # SoT, "red", "star"


class TestPlain:
    def test_bit_identical_to_stable_diffusion(self, pipe, components):
        reference = run(peer(StableDiffusionPipeline, components), num_images_per_prompt=2)
        assert np.array_equal(run(pipe, num_images_per_prompt=2), reference)

    def test_bit_identical_after_enable_disable(self, pipe, components, star_embedding):
        reference = run(peer(StableDiffusionPipeline, components))
        processors = dict(pipe.unet.attn_processors)
        pipe.enable_dag(star_embedding, max_edit_area=1.0, warmup_steps=1)
        guided = run(pipe, safety_concept=CONCEPT)
        pipe.disable_dag()
        pipe.enable_safety_guidance("sld", "max")
        pipe.disable_safety_guidance()
        assert not np.array_equal(guided, reference)
        assert np.array_equal(run(pipe), reference)
        assert all(pipe.unet.attn_processors[name] is proc for name, proc in processors.items())
        assert pipe.dag_config is None and pipe.safety_guidance_config is None

    def test_output_dataclass_and_tuple(self, pipe):
        output = pipe(PROMPT, num_inference_steps=2, output_type="np")
        assert output.unsafe_detected is None and output.dag_maps is None
        images, nsfw = pipe(PROMPT, num_inference_steps=2, output_type="np", return_dict=False)
        assert images.shape == (1, 32, 32, 3) and nsfw is None


class TestSLD:
    @pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
    def test_matches_stable_diffusion_pipeline_safe(self, pipe, components, preset):
        """Compared on the final latents (the pipelines' old `callback` sees them; StableDiffusionPipelineSafe has no
        latent output): the weak preset moves the decoded image by ~1e-6 but the latents by ~3e-4, so only there
        can a wrong weak step show."""

        def final_latents(pipeline, **kwargs):
            seen = []
            run(pipeline, num_inference_steps=17, callback=lambda i, t, latents: seen.append(latents), callback_steps=1,
                **kwargs)  # fmt: skip
            return seen[-1]

        safe = peer(StableDiffusionPipelineSafe, components)
        safe.safety_concept = CONCEPT
        reference = final_latents(safe, **getattr(SafetyConfig, preset.upper()))
        plain = final_latents(peer(StableDiffusionPipeline, components))
        pipe.enable_safety_guidance("sld", preset)
        ours = final_latents(pipe, safety_concept=CONCEPT)
        assert (ours - reference).abs().max() < 1e-6
        assert (ours - plain).abs().max() > 1e-4  # the preset did something the comparison above could miss

    def test_custom_parameters_default_concept_and_batch(self, pipe, components):
        options = {
            "sld_guidance_scale": 500,
            "sld_warmup_steps": 1,
            "sld_threshold": 0.02,
            "sld_momentum_scale": 0.2,
            "sld_mom_beta": 0.5,
        }
        safe = peer(StableDiffusionPipelineSafe, components)
        reference = run(safe, num_images_per_prompt=2, negative_prompt="a cat", **options)
        pipe.enable_safety_guidance("sld", **options)
        ours = run(pipe, num_images_per_prompt=2, negative_prompt="a cat")  # SLD's default concept text
        assert np.abs(ours - reference).max() < 1e-5


class TestSEGA:
    OPTIONS: ClassVar[dict] = {
        "edit_guidance_scale": 7.0,
        "edit_warmup_steps": 2,
        "edit_threshold": 0.8,
        "edit_momentum_scale": 0.3,
        "edit_mom_beta": 0.6,
    }

    def test_matches_semantic_pipeline(self, pipe, components):
        semantic = peer(SemanticStableDiffusionPipeline, components)
        reference = run(
            semantic, num_inference_steps=6, editing_prompt=[CONCEPT], reverse_editing_direction=True, **self.OPTIONS
        )
        pipe.enable_safety_guidance("sega", **self.OPTIONS)
        ours = run(pipe, num_inference_steps=6, safety_concept=CONCEPT)
        assert np.abs(ours - reference).max() < 1e-5
        assert not np.array_equal(ours, run(peer(StableDiffusionPipeline, components), num_inference_steps=6))

    def test_several_concepts_and_images(self, pipe, components):
        concepts = [CONCEPT, "a blue circle"]
        semantic = peer(SemanticStableDiffusionPipeline, components)
        reference = run(
            semantic,
            num_inference_steps=5,
            num_images_per_prompt=2,
            editing_prompt=concepts,
            reverse_editing_direction=[True, True],
            **self.OPTIONS,
        )
        pipe.enable_safety_guidance("sega", **self.OPTIONS)
        ours = run(pipe, num_inference_steps=5, num_images_per_prompt=2, safety_concept=concepts)
        assert np.abs(ours - reference).max() < 1e-5

    def test_defaults(self, pipe, components):
        semantic = peer(SemanticStableDiffusionPipeline, components)
        reference = run(semantic, num_inference_steps=12, editing_prompt=CONCEPT, reverse_editing_direction=True)
        pipe.enable_safety_guidance("sega")
        assert np.abs(run(pipe, num_inference_steps=12, safety_concept=CONCEPT) - reference).max() < 1e-5


class TestDAG:
    def test_raw_detection_map_is_the_share_before_min_max(self, pipe, star_embedding):
        """`normalize=False` gives the concept rows' attention share; min-max of it is the normal map."""
        pipe.enable_dag(star_embedding)
        noisy = torch.randn((2, 4, 16, 16), generator=torch.manual_seed(0))
        raw = pipe.dag_map(noisy, 500, prompt=PROMPT, normalize=False)
        normalized = pipe.dag_map(noisy, 500, prompt=PROMPT)
        assert raw.shape == normalized.shape == (2, 16, 16)
        assert 0 < raw.min() and raw.max() < 1  # probabilities, not stretched to [0, 1]
        torch.testing.assert_close(minmax_normalize(raw), normalized)

    def test_nothing_detected_is_bit_identical(self, pipe, components, silent_embedding):
        reference = run(peer(StableDiffusionPipeline, components), num_inference_steps=8)
        pipe.enable_dag(silent_embedding)
        output = pipe(
            PROMPT,
            num_inference_steps=8,
            generator=torch.manual_seed(0),
            output_type="np",
            safety_concept=CONCEPT,
            return_dag_maps=True,
        )
        assert np.array_equal(output.images, reference)
        assert output.unsafe_detected == [False]
        assert torch.equal(output.dag_maps, torch.zeros(1, 16, 16))

    def test_detected_region_guided_and_nothing_else(self, pipe, components, star_embedding):
        """With only the last step guided, the final latents differ from plain generation only inside the last
        step's edit region `Â >= τ_e`."""
        steps = 6
        plain = peer(StableDiffusionPipeline, components)
        reference = plain(PROMPT, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent")
        pipe.enable_dag(star_embedding, warmup_steps=steps - 1, max_edit_area=1.0, edit_mask_threshold=0.3)
        output = pipe(
            PROMPT,
            num_inference_steps=steps,
            generator=torch.manual_seed(0),
            output_type="latent",
            safety_concept=CONCEPT,
            return_dag_maps=True,
        )
        assert output.unsafe_detected == [True]
        maps = output.dag_maps
        assert maps.shape == (1, 16, 16) and maps.min() == 0 and maps.max() == 1
        changed = (output.images != reference.images).any(dim=1)
        assert changed.any()
        assert not (changed & (maps < 0.3)).any()

    def test_safety_pass_shares_the_cfg_batch_while_guiding(self, pipe, components, star_embedding, silent_embedding):
        """The first guided step runs the safety pass on its own (detection decides whether it is needed); while
        the previous step needed it, it rides in the CFG call's batch, as in SLD / SEGA. Nothing detected: the CFG
        call alone at every step."""
        batches = []  # the UNet's first layer sees every evaluation's real batch (DAG wraps the UNet's forward)
        hook = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
        try:
            pipe.enable_dag(star_embedding, max_edit_area=1.0, warmup_steps=2)
            guided = pipe(PROMPT, num_inference_steps=6, generator=torch.manual_seed(0), safety_concept=CONCEPT)
            assert guided.unsafe_detected == [True]
            assert batches == [2, 2, 2, 1, 3, 3, 3]
            batches.clear()
            pipe.enable_dag(silent_embedding)
            pipe(PROMPT, num_inference_steps=6, generator=torch.manual_seed(0), safety_concept=CONCEPT)
            assert batches == [2] * 6
        finally:
            hook.remove()

    @pytest.mark.parametrize("guidance", ["sega", "sld"])
    def test_batch_matches_single_images(self, pipe, star_embedding, guidance):
        pipe.enable_dag(star_embedding, guidance=guidance, max_edit_area=1.0, warmup_steps=1)
        prompts = [PROMPT, "a green square on a black background"]
        generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
        batch = pipe(prompts, num_inference_steps=4, generator=generators, output_type="np", safety_concept=CONCEPT)
        for index, prompt in enumerate(prompts):
            single = pipe(
                prompt,
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(index + 1),
                output_type="np",
                safety_concept=CONCEPT,
            )
            assert np.abs(single.images[0] - batch.images[index]).max() < 1e-4
            assert single.unsafe_detected[0] == batch.unsafe_detected[index]

    def test_several_concepts_num_images_callback(self, pipe, star_embedding, components):
        circle = concept_rows(components, "blue circle", 3)
        pipe.enable_dag([star_embedding, circle], max_edit_area=1.0, edit_mask_threshold=0.3, warmup_steps=0)
        steps = []

        def on_step_end(pipeline, i, t, tensors):
            steps.append(i)
            assert tensors["latents"].shape == (2, 4, 16, 16)
            return tensors

        output = pipe(
            PROMPT,
            num_inference_steps=3,
            num_images_per_prompt=2,
            output_type="np",
            generator=torch.manual_seed(0),
            safety_concept=[CONCEPT, "a blue circle"],
            callback_on_step_end=on_step_end,
            return_dag_maps=True,
        )
        assert steps == [0, 1, 2]
        assert output.images.shape == (2, 32, 32, 3) and output.dag_maps.shape == (2, 16, 16)
        assert output.unsafe_detected == [True, True]
        images, _nsfw, unsafe, maps, presence = pipe(
            PROMPT, num_inference_steps=2, output_type="np", return_dict=False, safety_concept=CONCEPT
        )
        assert images.shape == (1, 32, 32, 3) and maps is None and len(unsafe) == 1
        assert presence is None  # the paper's rule has no presence score

    def test_dag_scale_callback_input(self, pipe, star_embedding):
        """A callback can read each step's `S_dag`: zero in the warm-up, the guided scale after it (so positive only
        inside the last step's edit region), without changing the images; without DAG it is refused."""
        pipe.enable_dag(star_embedding, warmup_steps=2, max_edit_area=1.0, edit_mask_threshold=0.3)
        scales = []

        def on_step_end(pipeline, i, t, tensors):
            scales.append(tensors["dag_scale"].clone())
            return {**tensors, "dag_scale": torch.full_like(tensors["dag_scale"], 7.0)}  # read-only: ignored

        kwargs = {"num_inference_steps": 4, "output_type": "np", "safety_concept": CONCEPT, "return_dag_maps": True}
        watched = pipe(
            PROMPT,
            generator=torch.manual_seed(0),
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents", "dag_scale"],
            **kwargs,
        )
        plain = pipe(PROMPT, generator=torch.manual_seed(0), **kwargs)
        assert np.array_equal(watched.images, plain.images)
        assert [tuple(s.shape) for s in scales] == [(1, 16, 16)] * 4
        assert not scales[0].any() and not scales[1].any()
        assert scales[3].max() > 0
        edit = watched.dag_maps >= 0.3
        assert not scales[3][~edit].any()
        pipe.disable_dag()
        with pytest.raises(ValueError, match="'dag_scale' needs DAG"):
            pipe(
                PROMPT,
                num_inference_steps=2,
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["dag_scale"],
            )

    def test_prompt_embeds_input(self, pipe, components, silent_embedding):
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        plain = peer(StableDiffusionPipeline, components)
        reference = plain(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=3,
            generator=torch.manual_seed(0),
            output_type="np",
        ).images
        pipe.enable_dag(silent_embedding)
        ours = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=3,
            generator=torch.manual_seed(0),
            output_type="np",
            safety_concept=CONCEPT,
        ).images
        assert np.array_equal(ours, reference)

    def test_half_precision_after_enable_dag(self, pipe, star_embedding):
        """`pipe.to(dtype=float16)` after `enable_dag`: guided steps keep the latents in float16 (the float32
        detection map must not promote them) and the frozen projections and keys follow the UNet once."""
        pipe.enable_dag(star_embedding, max_edit_area=1.0, warmup_steps=1)
        pipe.to(dtype=torch.float16)
        output = pipe(
            PROMPT, num_inference_steps=4, generator=torch.manual_seed(0), output_type="latent", safety_concept=CONCEPT
        )
        assert output.unsafe_detected == [True]
        assert output.images.dtype == torch.float16 and torch.isfinite(output.images).all()
        assert all(p.weight.dtype == torch.float16 for p in pipe._dag.projections.values())
        assert all(k.dtype == torch.float16 for keys in pipe._dag.keys for k in keys.values())

    def test_capture_hooks_on_the_unet_only_during_a_call(self, pipe, star_embedding, components):
        before = dict(pipe.unet.attn_processors)
        pipe.enable_dag(star_embedding)
        assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
        seen = []

        def on_step_end(pipeline, i, t, tensors):
            seen.append(sorted(hooked_layers(pipeline.unet)))
            return tensors

        pipe(PROMPT, num_inference_steps=2, output_type="np", safety_concept=CONCEPT, callback_on_step_end=on_step_end)
        assert seen[0] and all("attn2" in n for n in seen[0])
        assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
        assert hooked_layers(pipe.unet) == set()
        # a second pipeline on the same UNet (from_pipe) with its own DAG works alongside
        other = DAGStableDiffusionPipeline.from_pipe(pipe)
        other.set_progress_bar_config(disable=True)
        other.enable_dag(star_embedding, layer_fractions=(0.5,))
        assert run(other, safety_concept=CONCEPT).shape == (1, 32, 32, 3)
        assert run(pipe, safety_concept=CONCEPT).shape == (1, 32, 32, 3)


class TestLoading:
    def test_from_pipe_and_from_pretrained(self, components, tmp_path, star_embedding):
        plain = peer(StableDiffusionPipeline, components)
        dag = DAGStableDiffusionPipeline.from_pipe(plain)
        dag.set_progress_bar_config(disable=True)
        assert np.array_equal(run(dag), run(plain))
        plain.save_pretrained(tmp_path)
        loaded = DAGStableDiffusionPipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert np.array_equal(run(loaded), run(plain))
        loaded.enable_dag(star_embedding)
        assert run(loaded, safety_concept=CONCEPT).shape == (1, 32, 32, 3)


class TestErrors:
    def test_enable_dag_errors(self, pipe, star_embedding):
        with pytest.raises(ValueError, match="none shipped with dag-safety .*'red star'.* was made for this UNet"):
            pipe.enable_dag()
        with pytest.raises(ValueError, match="width 8.*cross_attention_dim.*32"):
            pipe.enable_dag(torch.zeros(3, 8))
        bad = star_embedding.clone()
        bad[1, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or Inf"):
            pipe.enable_dag(bad)
        with pytest.raises(ValueError, match=r"unsafe_threshold.*\(0, 1\]"):
            pipe.enable_dag(star_embedding, unsafe_threshold=1.2)
        with pytest.raises(ValueError, match=r"edit_mask_threshold.*\(0, 1\]"):
            pipe.enable_dag(star_embedding, edit_mask_threshold=0)
        with pytest.raises(ValueError, match="no cross-attention layer"):
            pipe.enable_dag(star_embedding, layer_fractions=(1.0,))
        with pytest.raises(ValueError, match="Unknown guidance method 'esd'"):
            pipe.enable_dag(star_embedding, guidance="esd")
        with pytest.raises(ValueError, match="Unknown SLD preset"):
            pipe.enable_dag(star_embedding, guidance="sld", preset="ultra")
        with pytest.raises(ValueError, match="Unknown option"):
            pipe.enable_dag(star_embedding, unsafe_treshold=0.4)
        assert pipe.dag_config is None  # nothing half-enabled
        assert hooked_layers(pipe.unet) == set()

    def test_call_errors(self, pipe, star_embedding):
        with pytest.raises(ValueError, match="return_dag_maps=True` needs DAG"):
            pipe(PROMPT, num_inference_steps=1, return_dag_maps=True)
        pipe.enable_dag(star_embedding)
        with pytest.raises(ValueError, match="classifier-free guidance.*guidance_scale=1.0"):
            pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0)
        with pytest.raises(ValueError, match="disable_dag"):
            pipe.enable_safety_guidance("sld")
        pipe.disable_dag()
        pipe.enable_safety_guidance("sld", "strong")
        with pytest.raises(ValueError, match="classifier-free guidance"):
            pipe(PROMPT, num_inference_steps=1, guidance_scale=0.5)
        with pytest.raises(ValueError, match="SLD guides away from one safety concept"):
            pipe(PROMPT, num_inference_steps=1, safety_concept=["a", "b"])
        with pytest.raises(ValueError, match="disable_safety_guidance"):
            pipe.enable_dag(star_embedding)
        with pytest.raises(ValueError, match="Unknown SLD preset 'extreme'"):
            pipe.enable_safety_guidance("sld", "extreme")
        pipe.disable_safety_guidance()
        with pytest.raises(ValueError, match=r"sld_guidance_scale=1.0 turns SLD off"):
            pipe.enable_safety_guidance("sld", sld_guidance_scale=1.0)
        assert pipe.safety_guidance_config is None

    def test_dag_on_sld_takes_one_safety_concept(self, pipe, star_embedding):
        pipe.enable_dag(star_embedding, guidance="sld")
        with pytest.raises(ValueError, match="SLD guides away from one safety concept; got 2"):
            pipe(PROMPT, num_inference_steps=1, safety_concept=["a", "b"])

    def test_failed_enable_dag_keeps_the_enabled_dag(self, pipe, star_embedding):
        pipe.enable_dag(star_embedding, base_scale=7.0)
        with pytest.raises(ValueError, match="no cross-attention layer"):
            pipe.enable_dag(star_embedding, layer_fractions=(1.0,))
        assert pipe.dag_config is not None and pipe.dag_config.base_scale == 7.0

    def test_sequential_offload_is_refused_clearly(self, pipe, star_embedding):
        """Weights on the meta device (as `enable_sequential_cpu_offload` leaves them) cannot project keys."""
        pipe.unet.to("meta")
        with pytest.raises(ValueError, match="meta device.*enable_model_cpu_offload"):
            pipe.enable_dag(star_embedding, check_fingerprint=False)

    def test_compiled_unet(self, pipe, components, star_embedding):
        """A `torch.compile`d UNet (not run here: wrapping is enough) is hooked through the model it wraps."""
        from dag_safety.guideline_embedding import unet_fingerprint

        fingerprint = unet_fingerprint(pipe.unet)
        pipe.unet = torch.compile(pipe.unet)
        assert unet_fingerprint(pipe.unet) == fingerprint
        pipe.enable_dag(star_embedding)
        assert set(pipe._dag.projections) == set(pipe._dag.capture.layers)
        with pipe._guidance.attach(pipe):  # as a call attaches it: on the compiled model's own module
            assert "forward" in pipe.unet._orig_mod.__dict__ and hooked_layers(pipe.unet._orig_mod)
        assert "forward" not in pipe.unet._orig_mod.__dict__ and not hooked_layers(pipe.unet._orig_mod)

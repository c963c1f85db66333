"""Bad input to the pipeline and its configs: a clear error naming the option, raised before any work, and the
pipeline left as it was (issue: robustness). The tiny components of conftest keep each case fast."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from dag_safety.config import DAGConfig, SEGAConfig, SLDConfig

PROMPT = "a red star and a blue circle on a white background"


def star_rows(components):
    tokenizer, encoder = components["tokenizer"], components["text_encoder"]
    ids = tokenizer("red star", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder(ids.input_ids)[0][0, :3]


def run(pipeline, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipeline(PROMPT, generator=torch.manual_seed(0), output_type="np", **kwargs)


# ---------------------------------------------------------------------------------------------------- configs

WRONG_VALUES = {
    "float": ["0.5", None, True, float("nan"), float("inf"), torch.tensor(0.5), [0.5]],
    "int": [2.5, "3", None, True, float("nan")],
    "bool": ["no", 0, 1, None, "False"],
    "tuple[float, ...]": [0.5, "0.5", None, ("0.5",), (float("nan"),), {0.5: 1}],
}


def field_cases():
    for cls in (SLDConfig, SEGAConfig, DAGConfig):
        for item in dataclasses.fields(cls):
            for value in WRONG_VALUES.get(item.type, []):
                yield pytest.param(cls, item.name, value, id=f"{cls.__name__}.{item.name}={value!r}")


@pytest.mark.parametrize(("cls", "name", "value"), list(field_cases()))
def test_every_config_field_rejects_wrong_types_by_name(cls, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**{name: value})


def test_numpy_numbers_are_numbers():
    config = DAGConfig(unsafe_threshold=np.float32(0.5), warmup_steps=np.int64(3), area_scaler=np.bool_(False))
    assert config.warmup_steps == 3 and not config.area_scaler
    assert DAGConfig(layer_fractions=[0.5, 1]).layer_fractions == (0.5, 1)


def test_enable_dag_rejects_a_string_for_a_bool(pipe, components):
    """`area_scaler="no"` used to be accepted and to behave as `True`."""
    with pytest.raises(ValueError, match="`area_scaler` must be True or False, got 'no'"):
        pipe.enable_dag(star_rows(components), area_scaler="no")
    with pytest.raises(ValueError, match="`layer_fractions` must be a sequence"):
        pipe.enable_dag(star_rows(components), layer_fractions=0.5)
    with pytest.raises(ValueError, match="`unsafe_threshold` must be a real number"):
        pipe.enable_dag(star_rows(components), unsafe_threshold=None)
    assert pipe.dag_config is None


# ---------------------------------------------------------------------------------------------------- __call__


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": -1}, "`num_inference_steps` must be a positive integer, got -1"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be a positive integer"),
        ({"num_inference_steps": 2.5}, "`num_inference_steps` must be a positive integer"),
        ({"num_images_per_prompt": 0}, "`num_images_per_prompt` must be a positive integer"),
        ({"height": 64}, "Pass both `height` and `width`"),
        ({"width": 64}, "Pass both `height` and `width`"),
        ({"height": -64, "width": 64}, "`height` must be a positive integer"),
        ({"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number"),
        ({"eta": "1"}, "`eta` must be a finite number"),
        ({"generator": 42}, "`generator` must be a torch.Generator"),
        ({"callback_on_step_end_tensor_inputs": None}, "must be a list of tensor names"),
        ({"safety_concept": "a red star"}, "needs safety guidance, and none is enabled"),
        ({"return_dag_maps": True}, "needs DAG"),
    ],
)
def test_call_rejects_bad_arguments_before_any_work(pipe, kwargs, message):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    kwargs = {"num_inference_steps": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, generator=kwargs.pop("generator", None), **kwargs)
    assert calls == []


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("num_inference_step", "num_inference_steps"),
        ("safety_concepts", "safety_concept"),
        ("return_dag_map", "return_dag_maps"),
    ],
)
def test_misspelt_keyword_is_refused_with_the_closest_name(pipe, typo, suggestion):
    with pytest.raises(TypeError, match=f"unexpected keyword argument `{typo}`; did you mean `{suggestion}`"):
        pipe(PROMPT, **{typo: 3})


def test_safety_concept_must_be_text(pipe, components):
    pipe.enable_dag(star_rows(components))
    with pytest.raises(ValueError, match="`safety_concept` must be a non-empty string or list of strings, got 123"):
        run(pipe, safety_concept=123)


def test_valid_calls_are_still_stable_diffusion(pipe, components):
    """The checks only reject: a call that passes them is StableDiffusionPipeline's, bit for bit."""
    reference = StableDiffusionPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    for kwargs in ({}, {"height": 32, "width": 32, "num_images_per_prompt": 2, "eta": 0.5}):
        assert np.array_equal(run(pipe, **kwargs).images, run(reference, **kwargs).images)


# ---------------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("action", ["disable_dag", "enable_dag", "enable_safety_guidance", "disable_safety_guidance"])
def test_guidance_cannot_change_during_a_call(pipe, components, action):
    embedding = star_rows(components)
    pipe.enable_dag(embedding, warmup_steps=1)
    arguments = {"enable_dag": (embedding,), "enable_safety_guidance": ("sega",)}.get(action, ())

    def change(pipeline, i, t, tensors):
        getattr(pipeline, action)(*arguments)
        return tensors

    with pytest.raises(RuntimeError, match=f"`{action}\\(\\)` was called while the pipeline is generating"):
        run(pipe, callback_on_step_end=change)
    # unchanged and usable: the same output as a fresh pipeline with the same DAG
    assert pipe.dag_config is not None and pipe.safety_guidance_config is None
    fresh = type(pipe)(**components)
    fresh.set_progress_bar_config(disable=True)
    fresh.enable_dag(embedding, warmup_steps=1)
    assert np.array_equal(run(pipe).images, run(fresh).images)


def test_a_call_from_inside_a_call_is_refused(pipe):
    def nested(pipeline, i, t, tensors):
        run(pipeline)
        return tensors

    with pytest.raises(RuntimeError, match="called from inside one of its own calls"):
        run(pipe, callback_on_step_end=nested)
    assert not pipe._in_call


@pytest.mark.parametrize("step", ["first", "last"])
def test_non_finite_latents_never_read_as_safe(pipe, components, step):
    """NaN latents used to give an all-zero map and `unsafe_detected=[False]`. NaN from the first step reaches the
    detection; NaN after the last step only the decoded image."""
    pipe.enable_dag(star_rows(components), warmup_steps=1)

    def poison(pipeline, i, t, tensors):
        if i == (0 if step == "first" else pipeline.num_timesteps - 1):
            return {"latents": tensors["latents"] * math.nan}
        return tensors

    with pytest.raises(FloatingPointError, match="not finite"):
        run(pipe, return_dag_maps=True, callback_on_step_end=poison)


def test_detection_map_checks_the_latents_shape(pipe, components):
    pipe.enable_dag(star_rows(components))
    for latents in (torch.randn(1, 3, 16, 16), torch.randn(4, 16, 16)):
        with pytest.raises(ValueError, match=r"`latents` must be a \(B, 4, h, w\) tensor"):
            pipe.dag_map(latents, 500, prompt=PROMPT)
    assert pipe.dag_map(torch.randn(1, 4, 16, 16), 500, prompt=PROMPT).shape == (1, 16, 16)


def test_re_enabling_dag_after_loading_weights_names_them(pipe):
    """The fingerprint error names loaded safety weights as the cause, and the fix the README gives works."""
    from pathlib import Path

    from conftest import make_embedding

    embedding = make_embedding(pipe)
    pipe.enable_dag(embedding)
    pipe.load_safety_weights(Path(__file__).parent / "fixtures" / "spf_red_star_to_green_square.safetensors")
    with pytest.raises(ValueError, match=r"because safety weights are loaded \(\['spf'\]\).*check_fingerprint=False"):
        pipe.enable_dag(embedding)
    pipe.enable_dag(embedding, check_fingerprint=False)  # scores with the loaded projections, as documented

"""The safety methods the benchmarks compare, as set-ups of one `DAGStableDiffusionPipeline`."""

from __future__ import annotations

METHODS = (
    "none",
    "negative prompt",
    "SLD weak",
    "SLD medium",
    "SLD strong",
    "SLD max",
    "SEGA",
    "DAG + SEGA",
    "DAG + SEGA (presence rule)",
    "DAG + SLD",
    "DAG - AreaScaler",
    "DAG - MagnitudeScaler",
)
SEGA_OPTIONS = {"edit_guidance_scale": 10.0}  # the DAG paper's SEGA setting for nudity (section 4.1)


def configure(pipe, method: str, embedding, safety_concept: str, negative_prompt: str) -> dict:
    """Sets `pipe` up for `method` (resetting any earlier set-up) and returns the extra call kwargs.

    Args:
        embedding: a guideline embedding (path, Hub id, `GuidelineEmbedding` or tensor) for the DAG methods.
        safety_concept (`str`): the safety concept text (`e_s`) of the guided methods.
        negative_prompt (`str`): the text of the "negative prompt" baseline.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)}.")
    pipe.disable_dag()
    pipe.disable_safety_guidance()
    if method == "none":
        return {}
    if method == "negative prompt":
        return {"negative_prompt": negative_prompt}
    if method.startswith("SLD"):
        pipe.enable_safety_guidance("sld", method.split()[1])
    elif method == "SEGA":
        pipe.enable_safety_guidance("sega", **SEGA_OPTIONS)
    elif method == "DAG + SEGA":
        pipe.enable_dag(embedding, guidance="sega")
    elif method == "DAG + SEGA (presence rule)":
        pipe.enable_dag(embedding, guidance="sega", detection="presence")
    elif method == "DAG + SLD":
        pipe.enable_dag(embedding, guidance="sld")
    elif method == "DAG - AreaScaler":
        pipe.enable_dag(embedding, area_scaler=False)
    elif method == "DAG - MagnitudeScaler":
        pipe.enable_dag(embedding, magnitude_scaler=False)
    return {"safety_concept": safety_concept}

"""The safety methods the benchmarks compare, as set-ups of one `DAGStableDiffusionPipeline`."""

from __future__ import annotations

from dag_safety.guideline_embedding import GuidelineEmbedding

METHODS = (
    "none",
    "negative prompt",
    "SLD weak",
    "SLD medium",
    "SLD strong",
    "SLD max",
    "SEGA",
    "DAG + SEGA",
    "DAG + SEGA (paper rule)",
    "DAG + SEGA (presence rule)",
    "DAG + SEGA (head rule)",
    "DAG + SLD",
    "DAG - AreaScaler",
    "DAG - MagnitudeScaler",
)
# "DAG + SEGA" uses the embedding's own default rule (and the erase settings it brings with it); these name one
# rule each
RULE_METHODS = {
    "DAG + SEGA (paper rule)": "paper",
    "DAG + SEGA (presence rule)": "presence",
    "DAG + SEGA (head rule)": "head",
}
# Variants of the paper's method (Table 2's DAG + SLD, Table 5's ablations): the paper's rule and push whatever the
# embedding's defaults, since under a fill the base method and the scale values are unused
PAPER_VARIANTS = {
    "DAG + SLD": {"guidance": "sld"},
    "DAG - AreaScaler": {"area_scaler": False},
    "DAG - MagnitudeScaler": {"magnitude_scaler": False},
}
SEGA_OPTIONS = {"edit_guidance_scale": 10.0}  # the DAG paper's SEGA setting for nudity (section 4.1)


def detection_rules(embedding: GuidelineEmbedding) -> tuple[str, ...]:
    """The detection rules `embedding` can run with its own threshold, its default rule first.

    `"paper"` always; a calibrated threshold belongs to the presence head when the embedding carries one
    (`"head"`), else to the rows (`"presence"`).
    """
    rules = ["paper"]
    if embedding.metadata.presence_threshold is not None:
        rules.append("presence" if embedding.head is None else "head")
    default = embedding.metadata.detection
    return (default, *[rule for rule in rules if rule != default])


def default_methods(embedding: GuidelineEmbedding) -> list[str]:
    """Every method `embedding` can run, leaving out the named-rule row that would repeat "DAG + SEGA" (its default
    rule) and the rules it has no threshold for."""
    others = detection_rules(embedding)[1:]
    return [m for m in METHODS if m not in RULE_METHODS or RULE_METHODS[m] in others]


def configure(
    pipe, method: str, embedding, safety_concept: str, negative_prompt: str, dag_options: dict | None = None
) -> dict:
    """Sets `pipe` up for `method` (resetting any earlier set-up) and returns the extra call kwargs.

    Args:
        embedding: a guideline embedding (path, Hub id, `GuidelineEmbedding` or tensor) for the DAG methods.
        safety_concept (`str`): the safety concept text (`e_s`) of the guided methods.
        negative_prompt (`str`): the text of the "negative prompt" baseline.
        dag_options (`dict`, *optional*): `enable_dag` options every DAG method gets (`hold_detection`, say).
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
        pipe.enable_dag(embedding, guidance="sega", **(dag_options or {}))
    elif method in RULE_METHODS:
        pipe.enable_dag(embedding, guidance="sega", detection=RULE_METHODS[method], **(dag_options or {}))
    elif method in PAPER_VARIANTS:
        pipe.enable_dag(embedding, **{"detection": "paper", **PAPER_VARIANTS[method], **(dag_options or {})})
    return {"safety_concept": safety_concept}

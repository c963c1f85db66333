"""Training and evaluating the bundled mini model: run as scripts, never imported by `dag_safety` at runtime.

    python -m dag_safety.mini.training.reproduce --output-dir out/mini-repro   # the whole recipe, resumable
    python -m dag_safety.mini.training.evaluate --model dag_safety/mini/model  # world-quality report

`train_vae` and `train_unet` are the phases `reproduce` chains; `grounding` holds the token grounding loss,
`common` the seeded data, checkpoints, loss logs and EMA they share.
"""

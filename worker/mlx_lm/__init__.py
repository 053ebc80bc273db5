"""The mlx-lm job kind: ``python -m worker.mlx_lm`` takes ``mlx_lm.lora``'s options and fine-tunes (LoRA, DoRA
or full) under mlxsupd, with exact resume and a batch the daemon may change without changing the math.

``options`` and ``requirement`` import neither MLX nor mlx-lm (the daemon uses them to validate configs); the
rest of the package imports mlx-lm, whose tested range is ``requirement.REQUIREMENT``.
"""

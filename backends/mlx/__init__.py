"""The MLX backend: ``MlxEngine`` (engine.py) over our own mlx.nn MiniMind model (model.py).

Imported only when asked for (``backends.get("mlx")``), so nothing here runs on a machine
without MLX.
"""

"""python -m convert: Medusa checkpoints to GGUF (see __main__.py)."""

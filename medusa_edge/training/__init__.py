"""Training heads for any GGUF: prompts (prompts) and the trainer (train)."""

"""What keeps hostile files and fragile hardware from crashing the process: GGUF model checks before
llama.cpp loads a file (gguf_file) and the CPU-feature guard around model loading (hw)."""

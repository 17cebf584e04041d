"""Where a model comes from: a built-in alias, a .gguf file, a local Hugging Face folder or the hub (`loading.py`),
and the device it runs on (`device.py`). Below surgery: nothing here knows about SparseMLPs."""

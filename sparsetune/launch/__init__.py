"""Starting runs on several processes: named accelerate presets (DDP, FSDP, DeepSpeed ZeRO) and `--launch`."""

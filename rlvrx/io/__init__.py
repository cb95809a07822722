"""Files: atomic outputs, JSON/YAML reading, locks, and safetensors checkpoints (read, write, identify)."""

"""Lightning training: shared helpers and the LoRA expert trainer."""

"""loralab: train law / code / medical LoRA experts on one base model and compare request-level
routing (``router``) with token-level MoE-LoRA (``moelora``)."""

from loralab.config import register_resolvers

register_resolvers()

__version__ = "0.1.0"

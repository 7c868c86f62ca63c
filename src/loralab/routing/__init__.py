"""Training and evaluation of the request-level router (the ``router`` package is the library)."""

from loralab.routing.train import train_router

__all__ = ["train_router"]

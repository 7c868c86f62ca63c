"""The evaluation's one base model: every system is built on it and torn down after use.

``SharedBase.lend(what)`` hands the base model to a builder; on the way out (also on an error) it
puts back every module the wrapper replaced, the config values it changed (X-LoRA turns the KV
cache off) and drops attributes it added, then checks that the modules and parameters are the
same objects as when loaded and that the weights fingerprint is unchanged. Wrappers unload
themselves first (``MoELoraModel.unload()``, PEFT's ``unload()``); the restore is what makes a
wrapper that cannot unload, or unloads only partly, safe to use here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from loralab.base_model import weights_fingerprint

log = logging.getLogger(__name__)


class BaseModelChanged(RuntimeError):
    """A system left the shared base model different from how it was loaded."""


class SharedBase:
    """Holds the base model and what it looked like when loaded (see the module docstring)."""

    def __init__(self, model: nn.Module, fingerprint: str) -> None:
        self.model = model
        self.fingerprint = fingerprint
        self._children = [(m, dict(m._modules)) for m in model.modules()]
        self._parameters = [
            (n, p, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()
        ]
        self._attributes = set(vars(model))
        config = getattr(model, "config", None)
        self._config = dict(vars(config)) if config is not None else {}

    @contextmanager
    def lend(self, what: str) -> Iterator[nn.Module]:
        """The base model for building ``what``; restored and checked when the block ends."""
        try:
            yield self.model
        finally:
            self.restore(what)
        self.check(what)

    def restore(self, what: str) -> None:
        """Put back replaced modules, changed config values and added attributes."""
        fixed = []
        for module, children in self._children:
            if module._modules != children or any(
                module._modules[k] is not v for k, v in children.items()
            ):
                fixed.append(type(module).__name__)
                module._modules.clear()
                module._modules.update(children)
        for name in set(vars(self.model)) - self._attributes:
            fixed.append(f"attribute {name}")
            delattr(self.model, name)
        config = getattr(self.model, "config", None)
        for key, value in self._config.items():
            if config is not None and getattr(config, key, None) != value:
                fixed.append(f"config.{key}")
                setattr(config, key, value)
        for _, parameter, _, requires_grad in self._parameters:
            parameter.requires_grad_(requires_grad)  # PEFT freezes the base and leaves it so
        self.model.eval()
        if fixed:
            log.info("%s: restored on the shared base model: %s", what, ", ".join(fixed[:8]))

    def check(self, what: str) -> None:
        """Raise ``BaseModelChanged`` unless parameters and weights are exactly as loaded."""
        now = dict(self.model.named_parameters())
        for name, parameter, pointer, _ in self._parameters:
            if now.get(name) is not parameter or parameter.data_ptr() != pointer:
                raise BaseModelChanged(f"{what}: base parameter {name} was replaced")
        if len(now) != len(self._parameters):
            extra = sorted(set(now) - {n for n, _, _, _ in self._parameters})
            raise BaseModelChanged(f"{what}: parameters added to the base model: {extra[:5]}")
        fingerprint = weights_fingerprint(self.model)
        if fingerprint != self.fingerprint:
            raise BaseModelChanged(
                f"{what}: base weights fingerprint {fingerprint[:12]}… != {self.fingerprint[:12]}…"
            )

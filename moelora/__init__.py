"""Token-level MoE-LoRA: a trained gate mixes frozen LoRA experts per token and per layer.

Pure torch + safetensors; reads PEFT adapter folders directly. See model.MoELoraModel, and
routing.RowRouting for routing each row of a batch on its own (an adapter, the base, a mix, the gate).
"""

from moelora.config import AuxLossConfig, GateConfig, MoELoraConfig
from moelora.experts import ExpertAdapter, ExpertError, ExpertInfo, read_expert
from moelora.gate import Gate, Routing, route
from moelora.io import GateFileError, load_gate, load_moelora, read_gate_metadata, save_gate
from moelora.layer import MoELoraLinear
from moelora.losses import AuxLosses, GateTrace, aux_losses, expert_usage
from moelora.model import MoELoraModel
from moelora.routing import GATE, RowRouting

__all__ = [
    "GATE",
    "AuxLossConfig",
    "AuxLosses",
    "ExpertAdapter",
    "ExpertError",
    "ExpertInfo",
    "Gate",
    "GateConfig",
    "GateFileError",
    "GateTrace",
    "MoELoraConfig",
    "MoELoraLinear",
    "MoELoraModel",
    "Routing",
    "RowRouting",
    "aux_losses",
    "expert_usage",
    "load_gate",
    "load_moelora",
    "read_expert",
    "read_gate_metadata",
    "route",
    "save_gate",
]

"""Where the experts go in the base model, and how their weights are stacked per layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moelora.experts import ExpertAdapter, ExpertError
from moelora.layer import MoELoraLinear


def find_target(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Linear]:
    """(holder, attribute, linear) for the module at ``path``.

    A PEFT LoRA layer (anything with a ``base_layer``, PEFT's ``get_base_layer()`` chain) is
    followed down to its innermost base layer, which is what gets wrapped: the PEFT adapters keep
    working on top of the MoE-LoRA layer.
    """
    parent_path, _, attribute = path.rpartition(".")
    holder = model.get_submodule(parent_path)
    module = getattr(holder, attribute)
    while not isinstance(module, MoELoraLinear) and isinstance(
        getattr(module, "base_layer", None), nn.Module
    ):
        holder, attribute, module = module, "base_layer", module.base_layer
    if isinstance(module, MoELoraLinear):
        raise ExpertError(f"target '{path}' is already wrapped by a MoELoraModel; unload it first")
    if not isinstance(module, nn.Linear):
        raise ExpertError(f"target '{path}' is {type(module).__name__}, not nn.Linear")
    return holder, attribute, module


def stack_experts(
    module: nn.Linear, path: str, experts: Sequence[ExpertAdapter]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """One module's experts as lora_A [E, r_max, in] and lora_B [E, r_max, out] (scaled Bᵀ),
    zero-padded to the largest rank, in the module's dtype and device."""
    blocks = []
    for expert in experts:
        a, b = expert.weights[path]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise ExpertError(
                f"expert '{expert.info.name}' '{path}' maps {a.shape[1]}->{b.shape[0]}, base "
                f"layer maps {module.in_features}->{module.out_features}"
            )
        blocks.append((a, b * expert.scaling(path)))
    like = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
    return restack(blocks, like)


def restack(
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Stack per-expert (A [r, in], scaled B [out, r]) into lora_A [E, r_max, in] and lora_B
    [E, r_max, out] (Bᵀ), zero-padded (a rank may be 0), in ``like``'s dtype and device."""
    ranks = tuple(int(a.shape[0]) for a, _ in blocks)
    r_max = max(ranks)
    in_features, out_features = blocks[0][0].shape[1], blocks[0][1].shape[0]
    lora_A = like.new_zeros(len(blocks), r_max, in_features)
    lora_B = like.new_zeros(len(blocks), r_max, out_features)
    for index, (a, b) in enumerate(blocks):
        lora_A[index, : ranks[index]] = a
        lora_B[index, : ranks[index]] = b.t()
    return lora_A, lora_B, ranks


def check_fits(layers: Mapping[str, MoELoraLinear], adapter: ExpertAdapter) -> None:
    """An added expert must target a subset of the wrapped modules, with the same widths."""
    name = adapter.info.name
    unknown = sorted(set(adapter.weights) - set(layers))
    if unknown:
        raise ExpertError(
            f"expert '{name}' targets modules this model does not wrap: {unknown[:5]}"
        )
    for path, (a, b) in adapter.weights.items():
        layer = layers[path]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ExpertError(
                f"expert '{name}' '{path}' maps {a.shape[1]}->{b.shape[0]}, the wrapped layer "
                f"maps {layer.in_features}->{layer.out_features}"
            )


def append_expert(layer: MoELoraLinear, adapter: ExpertAdapter, path: str) -> None:
    """Restack ``layer`` with ``adapter`` as its last expert (rank 0 where it has no weights).

    The other experts' blocks are copied unchanged (already scaled), so their outputs do not
    change; a larger rank only adds zero padding.
    """
    blocks = [layer.expert_weights(i) for i in range(layer.num_experts)]
    if path in adapter.weights:
        a, b = adapter.weights[path]
        blocks.append((a, b * adapter.scaling(path)))
    else:
        none = layer.lora_A.new_zeros(0, layer.in_features)  # rank 0: adds nothing
        blocks.append((none, layer.lora_A.new_zeros(layer.out_features, 0)))
    layer.set_experts(*restack(blocks, layer.lora_A))


def drop_expert(layer: MoELoraLinear, index: int) -> None:
    """Restack ``layer`` without expert ``index`` (the padding shrinks to the remaining ranks)."""
    blocks = [layer.expert_weights(i) for i in range(layer.num_experts) if i != index]
    layer.set_experts(*restack(blocks, layer.lora_A))

"""Opacus per-sample gradients for PEFT's LoRA on an embedding (`peft.tuners.lora.Embedding`).

Opacus hooks the modules that own trainable tensors directly. PEFT's LoRA embedding keeps its two tensors in
ParameterDicts, whose forward never runs, so plain Opacus would find no per-sample gradient for them.
`LoraGradSampleModule` is Opacus's `GradSampleModule` (hooks mode) that also hooks each LoRA embedding as one layer
and fills the per-sample gradients of its tensors exactly:

    out[n, t] = E[x[n, t]] + s * B A[:, x[n, t]]        A: r x V (zero at init), B: d x r, s = alpha / r
    dL_n/dB            = s * sum_t g[n, t] (outer) A[:, x[n, t]]
    dL_n/dA[:, v]      = s * sum_{t : x[n, t] = v} B^T g[n, t]

with g[n, t] the gradient of sample n's loss at its output position t (Opacus hands it over already scaled for the
loss reduction). Every other layer is Opacus's own grad sampler, unchanged. `tests/test_dp.py` checks both against
one-example autograd gradients. The wide part's table (`shared.wide.WideTable`) has a grad sampler of its own as well
(checked in tests/test_wide.py).
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.utils.module_utils import trainable_parameters
from peft.tuners.lora.layer import Embedding as LoraEmbedding

from shared.wide import WideTable


def lora_embedding_grad_sample(layer: LoraEmbedding, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the active adapter's `lora_embedding_A` and `lora_embedding_B` (vanilla LoRA only)."""
    (name,) = layer.active_adapters
    if name in layer.lora_variant or layer._get_embed_scale() is not None:
        raise ValueError("per-sample gradients are implemented for vanilla LoRA on an unscaled embedding only")
    a, b, scale = layer.lora_embedding_A[name], layer.lora_embedding_B[name], layer.scaling[name]
    ids = activations[0]  # (N, T) token ids
    grad = backprops.to(b.dtype) * scale  # (N, T, d)
    padding = layer.get_base_layer().padding_idx
    if padding is not None:
        grad = grad * (ids != padding).unsqueeze(-1).to(grad.dtype)  # the padding row takes no gradient
    out = {}
    if a.requires_grad:
        per_position = grad @ b  # (N, T, r): B^T g at each position
        rows = torch.zeros((ids.shape[0], a.shape[1], a.shape[0]), dtype=per_position.dtype, device=ids.device)
        rows.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, a.shape[0]), per_position)  # (N, V, r)
        out[a] = rows.transpose(1, 2)
    if b.requires_grad:
        out[b] = torch.einsum("ntd,ntr->ndr", grad, torch.nn.functional.embedding(ids, a.t()))
    return out


def wide_table_grad_sample(layer: WideTable, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the wide part's table (`shared.wide.WideTable`): Opacus's embedding rule on the rows
    looked up, plus each example's gradient at the shared rows, which every example reads once."""
    ids = activations[0]  # (N, T) row ids
    if not layer.weight.requires_grad:
        return {}
    grad = torch.zeros((ids.shape[0], *layer.weight.shape), dtype=backprops.dtype, device=ids.device)
    grad.scatter_add_(1, ids.unsqueeze(-1), backprops[:, :ids.shape[1]])
    start, end = layer.shared_rows
    grad[:, start:end] += backprops[:, ids.shape[1]:]
    return {layer.weight: grad}


class LoraGradSampleModule(GradSampleModule):
    """`GradSampleModule` that treats each PEFT LoRA embedding as one layer with the grad sampler above, and the wide
    part's table with its own."""

    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, LoraEmbedding: lora_embedding_grad_sample,
                     WideTable: wide_table_grad_sample}

    def iterate_submodules(self, module: torch.nn.Module):
        if isinstance(module, LoraEmbedding):
            if any(p.requires_grad for p in module.parameters()):
                yield module  # its tensors live in ParameterDicts below it: handled here, not recursed into
            return
        yield from super().iterate_submodules(module)

    def capture_activations_hook(self, module: torch.nn.Module, forward_input, forward_output) -> None:
        if not isinstance(module, LoraEmbedding):
            super().capture_activations_hook(module, forward_input, forward_output)
            return
        # Opacus's own hook asks whether the module owns a trainable tensor directly, which a LoRA embedding never
        # does; the rest is the same bookkeeping.
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append([t.detach() for t in forward_input])
        for _, p in trainable_parameters(module):
            p._forward_counter += 1

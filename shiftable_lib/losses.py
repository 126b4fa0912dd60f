"""Training losses that PyTorch's own ops would compute more slowly."""

from __future__ import annotations

import torch
from torch import Tensor


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Tied-head logits and cross-entropy in chunks, the gradient computed in the same pass.

    On a CPU the (tokens x vocab) logits are the largest tensor of a step; a chunk of them
    stays in cache while it is exponentiated, normalised and multiplied back, and is never
    written out whole. Same loss and gradients as linear + F.cross_entropy.
    """

    CHUNK = 512

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        N = h.shape[0]
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, N, FusedLinearCrossEntropy.CHUNK):
            end = min(N, s + FusedLinearCrossEntropy.CHUNK)
            hc, tc = h[s:end], targets[s:end]
            rows = torch.arange(hc.shape[0], device=h.device)
            p = hc @ w.T
            p.sub_(p.amax(-1, keepdim=True)).exp_()
            norm = p.sum(-1, keepdim=True)
            total += norm.log().sum() - p[rows, tc].log().sum()  # -log softmax at the target
            p.div_(norm)
            p[rows, tc] -= 1
            grad_h[s:end] = p @ w
            grad_w.addmm_(p.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total / N

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        scale = grad / grad_h.shape[0]
        return grad_h * scale, grad_w * scale, None

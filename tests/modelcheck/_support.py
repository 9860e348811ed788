"""Helpers the model-check tests share."""

from __future__ import annotations

from typing import Any


def seeded(torch: Any, cls: Any, seed: int) -> Any:
    """``cls()`` built from ``seed`` in eval mode, every bias drawn from U(-0.5, 0.5): torch starts some biases
    (attention's) at zero, and a zero bias in the wrong place checks nothing."""
    torch.manual_seed(seed)
    model = cls().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    return model

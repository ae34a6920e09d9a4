"""Launch helpers shared by the Triton launchers."""

import contextlib


def device_guard(t):
    """Context in which a Triton kernel launch on ``t``'s device happens.

    Triton launches on the *current* CUDA device, so a tensor on cuda:1 needs
    ``torch.cuda.device(t.device)`` around the launch.  CPU (interpreter) and meta
    tensors get a null context: nothing here touches CUDA for them.
    """
    if t.device.type == "cuda":
        import torch

        return torch.cuda.device(t.device)
    return contextlib.nullcontext()

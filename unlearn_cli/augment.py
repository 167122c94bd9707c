"""Training-time augmentation as batched tensor ops on raw images, on whatever device they live.

Random crop with zero padding and random horizontal flip, the seed recipe's
`RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`, done for a whole batch at once by one
gather (`crop_flip`) instead of per image on the CPU (~135 us per image per core there). Padding
with zeros before normalisation gives what torchvision gives: black borders.

The random draws (`draw`) come from the caller's seeded CPU generator, one epoch at a time, and are
moved to the data's device once per epoch: a run is the same on CPU and GPU and depends only on
its seed.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def draw(n: int, *, padding: int, flip: bool, generator: torch.Generator
         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random crop offsets int64 [n, 2] in 0..2*padding (None without padding) and flip flags
    bool [n] (None without flip), for the n batch positions of one epoch."""
    shifts = (torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
              if padding > 0 else None)
    flips = torch.randint(0, 2, (n,), generator=generator).bool() if flip else None
    return shifts, flips


def crop_flip(images: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None,
              padding: int) -> torch.Tensor:
    """Crop and flip a batch. images [B, C, H, W] (any dtype); shifts [B, 2] (row, column offsets
    into the zero-padded image) or None; flips bool [B] or None. Returns [B, C, H, W]."""
    if shifts is None and flips is None:
        return images
    b, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    if shifts is not None and padding > 0:
        images = F.pad(images, (padding, padding, padding, padding))
        rows = rows + shifts[:, :1]
        cols = cols + shifts[:, 1:]
    # out[i, ch, r, s] = images[i, ch, rows[i, r], cols[i, s]]: one gather for crop and flip.
    return images[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]

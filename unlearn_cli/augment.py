"""Training-time augmentation as batched tensor ops on raw images, on whatever device they live.

Random crop after padding and horizontal flip, the seed recipe's `RandomCrop(32, padding=4)` +
`RandomHorizontalFlip()`, done for a whole batch at once by one gather (`crop_flip`) instead of per
image on the CPU (~135 us per image per core there). Padding is `zeros` (torchvision's black
borders: zero pixels before normalisation) or `reflect` (airbench94's: the border pixels mirrored).

Flips are `random` (each image, each epoch, a coin) or `alternate` (airbench94): a coin per image
in the first epoch, then every image flipped the other way from the epoch before, so that over two
epochs every image is seen both ways.

The random draws (`Augmenter.draw`) come from the caller's seeded CPU generator, one epoch at a
time, and are moved to the data's device once per epoch: a run is the same on CPU and GPU and
depends only on its seed. `translate` shifts whole batches by a fixed offset with reflection, for
test-time augmentation.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

PADDING_MODES = ("zeros", "reflect")
FLIP_MODES = ("random", "alternate")


def draw(n: int, *, padding: int, flip: bool, generator: torch.Generator
         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random crop offsets int64 [n, 2] in 0..2*padding (None without padding) and flip flags
    bool [n] (None without flip), for the n batch positions of one epoch."""
    shifts = (torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
              if padding > 0 else None)
    flips = torch.randint(0, 2, (n,), generator=generator).bool() if flip else None
    return shifts, flips


class Augmenter:
    """One training run's augmentation draws, epoch by epoch (the run's generator is shared with
    its data order, so draws interleave with the orders exactly as `fit` makes them).

    `flip_mode` random draws like `draw`; alternate draws one coin per image (by dataset index)
    in epoch 0 and flips image i in epoch e when coin_i XOR (e odd).
    """

    def __init__(self, n: int, *, padding: int, flip: bool, flip_mode: str = "random"):
        if flip_mode not in FLIP_MODES:
            raise ValueError(f"unknown flip mode {flip_mode!r}; expected one of {FLIP_MODES}")
        self.n, self.padding, self.flip, self.flip_mode = n, padding, flip, flip_mode
        self.coins: torch.Tensor | None = None  # alternate: bool [n] by dataset index
        self.epoch = 0

    def draw(self, order: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Crop offsets [n, 2] and flip flags [n] for the batch positions of the next epoch, whose
        data order is `order` [n] (CPU)."""
        alternate = self.flip and self.flip_mode == "alternate"
        shifts, flips = draw(self.n, padding=self.padding, flip=self.flip and (
            not alternate or self.coins is None), generator=generator)
        if alternate:
            if self.coins is None:
                self.coins = flips  # drawn above, for epoch 0; kept by dataset index
            flips = self.coins[order] ^ bool(self.epoch % 2)
        self.epoch += 1
        return shifts, flips


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside 0..size-1 mirrored back in (without repeating the edge): -1 -> 1."""
    index = index.abs()
    return (size - 1) - ((size - 1) - index).abs()


def crop_flip(images: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None,
              padding: int, mode: str = "zeros") -> torch.Tensor:
    """Crop and flip a batch. images [B, C, H, W] (any dtype); shifts [B, 2] (row, column offsets
    into the padded image, 0..2*padding) or None; flips bool [B] or None; mode zeros | reflect
    (padding <= H - 1). Returns [B, C, H, W]."""
    if shifts is None and flips is None:
        return images
    b, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    if shifts is not None and padding > 0:
        if mode == "reflect":
            # Index the unpadded image: no padded copy of the batch is made.
            rows = _reflect(rows + shifts[:, :1] - padding, h)
            cols = _reflect(cols + shifts[:, 1:] - padding, w)
        elif mode == "zeros":
            images = F.pad(images, (padding, padding, padding, padding))
            rows = rows + shifts[:, :1]
            cols = cols + shifts[:, 1:]
        else:
            raise ValueError(f"unknown padding mode {mode!r}; expected one of {PADDING_MODES}")
    # out[i, ch, r, s] = images[i, ch, rows[i, r], cols[i, s]]: one gather for crop and flip.
    return images[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def translate(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Every image of [B, C, H, W] moved by (rows, cols) pixels, the uncovered border filled by
    reflection (F.pad's `reflect`), for any dtype (uint8 included)."""
    _, _, h, w = images.shape
    dev = images.device
    r = _reflect(torch.arange(h, device=dev) - rows, h)
    c = _reflect(torch.arange(w, device=dev) - cols, w)
    return images[:, :, r[:, None], c[None, :]]

"""Training-time augmentation (MONAI random transforms), seeded so that a run can be repeated exactly.

Each batch's transforms draw from a generator seeded by ``(train.seed, epoch, rank, batch index)``
and nothing else: not the OS's entropy, not which process happens to run it. A run resumed from a
checkpoint therefore sees the very transforms the uninterrupted run saw, and a worker's batches are
augmented differently every epoch and on every rank. That is why augmentation runs in the training
worker, which knows those four numbers, rather than in the Ray Data pipeline, which does not know
the epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from jointray.config import AugmentConfig

#: The independent random streams of a run, told apart by the first key after the seed.
AUGMENT, SHUFFLE, RESTART = 0, 1, 2


def stream_seed(seed: int, stream: int, *keys: int) -> int:
    """A 32-bit seed that depends on every number given (NumPy's SeedSequence mixes them), e.g.
    ``stream_seed(seed, AUGMENT, epoch, rank, batch)``."""
    return int(np.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0])


class Augmenter:
    """MONAI random transforms of image (C, X, Y, Z) and label (X, Y, Z), one independent draw per case."""

    def __init__(self, cfg: AugmentConfig):
        keys = ["image", "label"]
        rotate = np.deg2rad(cfg.rotate_deg)
        self.transform = Compose([
            *[RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in cfg.flip_axes],
            RandAffined(keys, prob=cfg.affine_prob, rotate_range=(rotate,) * 3, scale_range=(cfg.scale,) * 3,
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandAffined(keys, prob=cfg.shift_prob, translate_range=(cfg.shift_voxels,) * 3,
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandScaleIntensityd("image", factors=0.1, prob=cfg.intensity_prob),
            RandShiftIntensityd("image", offsets=0.1, prob=cfg.intensity_prob),
            RandGaussianNoised("image", std=cfg.noise_std, prob=cfg.intensity_prob),
        ])

    def __call__(self, batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        """A copy of ``batch`` (NumPy columns; image (B, C, X, Y, Z), label (B, X, Y, Z)) with every case
        transformed; the other columns pass through."""
        self.transform.set_random_state(seed=seed)
        images, labels = [], []
        for image, label in zip(batch["image"], batch["label"], strict=True):
            out = self.transform({"image": torch.from_numpy(np.array(image, np.float32)),
                                  "label": torch.from_numpy(np.array(label))[None]})
            images.append(np.asarray(out["image"], dtype=np.float32))
            labels.append(np.asarray(out["label"])[0].astype(np.asarray(label).dtype))
        return batch | {"image": np.stack(images), "label": np.stack(labels)}

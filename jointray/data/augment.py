"""Training-time augmentation (MONAI random transforms), seeded so that a run can be repeated exactly.

Each batch's transforms draw from a generator seeded by ``(train.seed, epoch, rank, batch index)``
and nothing else: not the OS's entropy, not which process happens to run it. A run resumed from a
checkpoint therefore sees the very transforms the uninterrupted run saw, and a worker's batches are
augmented differently every epoch and on every rank. That is why augmentation runs in the training
worker, which knows those four numbers, rather than in the Ray Data pipeline, which does not know
the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    crop_or_pad_nd,
)

from jointray.config import AugmentConfig

#: The independent random streams of a run, told apart by the first key after the seed.
AUGMENT, SHUFFLE, RESTART = 0, 1, 2


def stream_seed(seed: int, stream: int, *keys: int) -> int:
    """A 32-bit seed that depends on every number given (NumPy's SeedSequence mixes them), e.g.
    ``stream_seed(seed, AUGMENT, epoch, rank, batch)``."""
    return int(np.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0])


class RandIntegerShiftd(RandomizableTransform, MapTransform):
    """Move every key's array by the same whole number of voxels, up to ``max_voxels`` along each spatial
    axis (drawn uniformly per axis), filling the uncovered border with zeros.

    What ``RandAffined(translate_range=...)`` does, without the resampling: a whole-voxel shift is exact for
    image and label alike (no interpolation to blur the image or to round the label), and it costs a copy
    instead of a pass of ``grid_sample`` over the volume. nnU-Net gets the same from choosing where its
    training patch sits in the padded case. MONAI's ``crop_or_pad_nd`` (what lazy resampling does with an
    integer translation) moves the arrays.

    Shapes: every key (C, X, Y, Z) → the same shape.
    """

    def __init__(self, keys: KeysCollection, max_voxels: int, prob: float):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.max_voxels = max_voxels
        self.offset = np.zeros(3, int)

    def randomize(self, data: None = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.offset = self.R.randint(-self.max_voxels, self.max_voxels + 1, size=3)

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        matrix = np.eye(4)
        matrix[:3, 3] = -self.offset  # crop_or_pad_nd reads output voxel x from input voxel x + translation
        for key in self.key_iterator(out):
            out[key] = crop_or_pad_nd(out[key], matrix, out[key].shape[1:], mode="constant")
        return out


class Augmenter:
    """MONAI random transforms of image (C, X, Y, Z) and label (X, Y, Z), one independent draw per case.

    In nnU-Net's order: spatial transforms (mirroring, rotation and scaling, elastic deformation, shift),
    then intensity transforms (noise, blur, brightness, offset, contrast, low resolution, gamma of the
    inverted image, gamma). The label follows every spatial transform by nearest-neighbour sampling.
    A transform whose probability is 0 draws nothing and costs nothing.
    """

    def __init__(self, cfg: AugmentConfig):
        keys, image = ["image", "label"], "image"
        resample = {"mode": ("bilinear", "nearest"), "padding_mode": "zeros"}
        degrees = cfg.rotate_deg if isinstance(cfg.rotate_deg, tuple) else (cfg.rotate_deg,) * 3
        low, high = cfg.zoom_range()
        candidates = [
            *[(cfg.flip_prob, lambda p, axis=axis: RandFlipd(keys, prob=p, spatial_axis=axis))
              for axis in cfg.flip_axes],
            (cfg.affine_prob, lambda p: RandAffined(keys, prob=p, rotate_range=tuple(np.deg2rad(degrees)),
                                                    scale_range=((low - 1, high - 1),) * 3, **resample)),
            (cfg.elastic_prob, lambda p: Rand3DElasticd(keys, sigma_range=cfg.elastic_sigma, prob=p,
                                                        magnitude_range=cfg.elastic_magnitude, **resample)),
            (cfg.shift_prob, lambda p: RandIntegerShiftd(keys, max_voxels=cfg.shift_voxels, prob=p)),
            (cfg.noise_prob, lambda p: RandGaussianNoised(image, std=cfg.noise_std, prob=p)),
            (cfg.blur_prob, lambda p: RandGaussianSmoothd(image, sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma,
                                                          sigma_z=cfg.blur_sigma, prob=p)),
            (cfg.brightness_prob, lambda p: RandScaleIntensityd(image, factors=cfg.brightness, prob=p)),
            (cfg.offset_prob, lambda p: RandShiftIntensityd(image, offsets=cfg.offset, prob=p)),
            (cfg.contrast_prob, lambda p: RandScaleIntensityFixedMeand(image, factors=cfg.contrast, preserve_range=True,
                                                                       prob=p)),
            (cfg.lowres_prob, lambda p: RandSimulateLowResolutiond(image, zoom_range=cfg.lowres_zoom, prob=p)),
            (cfg.gamma_inverted_prob, lambda p: RandAdjustContrastd(image, gamma=cfg.gamma, invert_image=True,
                                                                    retain_stats=True, prob=p)),
            (cfg.gamma_prob, lambda p: RandAdjustContrastd(image, gamma=cfg.gamma, retain_stats=True, prob=p)),
        ]
        self.transform = Compose([make(prob) for prob, make in candidates if prob > 0])

    def in_line(self, batches: Iterable[dict[str, np.ndarray]],
                seed: Callable[[int], int]) -> Iterator[dict[str, np.ndarray]]:
        """``batches`` augmented, batch i with ``seed(i)``, each when the caller asks for it, in the caller's thread."""
        for index, batch in enumerate(batches):
            yield self(batch, seed(index))

    def ahead(self, batches: Iterable[dict[str, np.ndarray]],
              seed: Callable[[int], int]) -> Iterator[dict[str, np.ndarray]]:
        """``batches`` augmented, batch i with ``seed(i)``, one batch ahead in a background thread: batch
        i + 1 is transformed while the caller trains on batch i. MONAI's and torch's kernels release the
        GIL, so where the caller's step leaves the CPU free (it runs on a GPU) the trainer need not wait for
        its data. Not where the step itself computes on the CPU: the thread's torch kernels run their own
        OpenMP team beside the step's, on the same cores, and both slow down (``in_line`` is the faster
        there; benchmarks/README.md). The result is the same as augmenting in line, whatever the timing; a
        caller that stops early waits for at most the one batch in flight."""
        with ThreadPoolExecutor(1, thread_name_prefix="augment") as pool:
            pending = None
            for index, batch in enumerate(batches):
                submitted = pool.submit(self, batch, seed(index))
                if pending is not None:
                    yield pending.result()
                pending = submitted
            if pending is not None:
                yield pending.result()

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

"""The plain baseline for ``accuracy_msd.py``: a textbook MONAI training loop under the same budget, on the
same held-out test cases.

What a practitioner writes in an afternoon (issue 13's baseline): ``monai.networks.nets.UNet`` (channels
16–128, strides 2, 2 residual units, instance norm), ``DiceCELoss``, random left-right flips, AdamW at
a constant 2e-3, batch 4, every case of the pool (no validation split, no checkpoint selection: the
last weights), no test-time mirroring. Preprocessing as jointray's for MSD (RAS, 1 mm, z-score over
the foreground, padded to 48 × 64 × 48); predictions go back to each input's own grid with MONAI's
``Invertd`` and are scored there by the same metric code as ``jointray evaluate`` (Dice; HD95 with a
missed structure at the image diagonal).

    python benchmarks/plain_monai.py --minutes 3.5 10 20     # one run per budget, one table

The test cases are ``accuracy_msd.py``'s (``--test-fraction``, ``--test-seed``): the two tables compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from accuracy_msd import NNUNET_DICE, REPO, hold_out
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    Spacingd,
    SpatialPadd,
)
from rich.console import Console
from rich.table import Table

from jointray.data.sources import scan_msd
from jointray.metrics import segmentation_metrics

STRUCTURES = {1: "anterior", 2: "posterior"}
LABEL_NAMES = {0: "background", **STRUCTURES}
SHAPE = (48, 64, 48)


def preprocessing() -> Compose:
    return Compose([
        LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
        NormalizeIntensityd(keys="image", nonzero=True), SpatialPadd(keys=["image", "label"], spatial_size=SHAPE),
    ])


def monai_items(folder: Path) -> list[dict[str, str]]:
    """The cases of an MSD folder as MONAI dictionary items."""
    return [{"image": r.images[0], "label": r.label} for r in scan_msd(folder, LABEL_NAMES).records]


def train(cases: list[dict[str, str]], minutes: float, seed: int) -> tuple[UNet, int]:
    """The loop; returns the last weights and the epochs run within ``minutes``."""
    torch.manual_seed(seed)
    data = CacheDataset(cases, Compose([preprocessing(), RandFlipd(keys=["image", "label"], prob=0.5,
                                                                   spatial_axis=0)]).set_random_state(seed),
                        progress=False)
    loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=0, drop_last=True)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                 num_res_units=2, norm=Norm.INSTANCE)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    deadline, epochs = time.monotonic() + 60 * minutes, 0
    while time.monotonic() < deadline:
        model.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch["image"]), batch["label"]).backward()
            optimizer.step()
            if time.monotonic() >= deadline:
                break
        epochs += 1
    return model.eval(), epochs


@torch.no_grad()
def score(model: UNet, cases: list[dict[str, str]]) -> dict[str, float]:
    """Mean per-case Dice and HD95 per structure, on each input's own grid."""
    pre = preprocessing()
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
                    AsDiscreted(keys="pred", argmax=True)])
    rows: dict[str, list[float]] = {}
    for case in cases:
        item = pre(case)
        item["pred"] = model(item["image"][None])[0].softmax(0)
        pred = torch.as_tensor(np.asarray(post(item)["pred"]))[0].long()
        label = torch.as_tensor(np.asarray(LoadImaged(keys="label", image_only=True)(case)["label"])).long()
        spacing = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
        scores = segmentation_metrics(pred[None], label[None], STRUCTURES, spacing, distances=("hd95",))
        for key, value in scores.items():
            rows.setdefault(key, []).append(float(value[0]))
    return {key: float(np.mean(values)) for key, values in rows.items()
            if key.split("/")[0] in ("dice", "hd95", "missed")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--minutes", type=float, nargs="+", default=[3.5, 10.0, 20.0])
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--test-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-dir", default="runs/bench_msd_split")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plain_monai.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.root)
    pool, test_folder, test_ids = hold_out(root, LABEL_NAMES, args.test_fraction, args.test_seed, Path(args.split_dir))
    train_cases, test_cases = monai_items(pool), monai_items(test_folder)
    console = Console(width=160)
    table = Table(title=f"plain MONAI loop on MSD hippocampus: {len(train_cases)} training cases, "
                        f"{len(test_cases)} held-out test cases (the last weights, no mirroring)")
    for column in ("minutes", "epochs", "Dice anterior", "Dice posterior", "mean Dice", "HD95 mm (mean)",
                   "missed", "gap to nnU-Net"):
        table.add_column(column, justify="right")
    runs = []
    for minutes in args.minutes:
        model, epochs = train(train_cases, minutes, args.seed)
        metrics = score(model, test_cases)
        mean = float(np.mean([metrics[f"dice/{n}"] for n in STRUCTURES.values()]))
        hd95 = float(np.mean([metrics[f"hd95/{n}"] for n in STRUCTURES.values()]))
        missed = sum(metrics[f"missed/{n}"] * len(test_cases) for n in STRUCTURES.values())
        runs.append({"minutes": minutes, "epochs": epochs, "metrics": metrics, "dice": mean})
        table.add_row(f"{minutes:g}", str(epochs), f"{metrics['dice/anterior']:.4f}",
                      f"{metrics['dice/posterior']:.4f}", f"{mean:.4f}", f"{hd95:.2f}", f"{missed:.0f}",
                      f"{mean - np.mean(list(NNUNET_DICE.values())):+.4f}")
        console.print(f"{minutes:g} min: {epochs} epochs, mean Dice {mean:.4f}")
    console.print(table)
    summary = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "training_cases": len(train_cases), "test_cases": len(test_cases), "test_seed": args.test_seed,
               "test_subjects": sorted(test_ids), "seed": args.seed, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

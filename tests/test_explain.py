"""Explanations: the activation maps pass the model-randomisation sanity check on real MRI and single out the
structures, Integrated Gradients adds up, and ``jointray explain`` writes the maps, the attributions and the
report that shows them."""

from __future__ import annotations

import copy
import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MSD_TRAIN_CASES, msd_subset, shared_data
from scipy import stats
from typer.testing import CliRunner

from jointray.cli import app
from jointray.inference.explain import clinical_attributions, explain_case, explained_input, with_held_volumes
from jointray.inference.predictor import Predictor
from jointray.models import build_model

#: Adebayo et al. 2018's check: a map that survives randomising the weights explains the input, not the model.
#: Spearman's ρ between the trained and the randomised model's maps must stay below this.
RANDOMISED_RHO_BOUND = 0.5


def test_activation_maps_of_the_trained_msd_model_find_the_structures_and_not_those_of_a_random_one(
        msd_checkpoint, tmp_path):
    msd = shared_data("msd_hippocampus")
    _, entries = msd_subset(msd, tmp_path / "cases", MSD_TRAIN_CASES, 3)
    predictor = Predictor(msd_checkpoint, device="cpu")
    randomised = Predictor(msd_checkpoint, device="cpu")
    torch.manual_seed(1234)
    fresh = build_model(randomised.config.model, randomised.spec.channels, randomised.schema)
    randomised.models[0].load_state_dict(fresh.state_dict())  # every weight re-drawn (cascading to the end)
    for entry in entries:
        case = predictor.prepare(msd / entry["image"])
        trained, random = explain_case(predictor, case), explain_case(randomised, case)
        mask = predictor.finish(case, predictor.forward([case], 1, "heads")[0], 1, "heads").mask
        assert trained.layers == {"anterior": "decoder.levels.2", "posterior": "decoder.levels.2"}
        assert set(trained.maps) == {"anterior", "posterior"}
        assert trained.method == "HiResCAM"
        for k, target in ((1, "anterior"), (2, "posterior")):
            heat = trained.maps[target]
            assert heat.shape == mask.shape and 0 <= heat.min() and heat.max() <= 1 + 1e-6
            rho = stats.spearmanr(heat.ravel(), random.maps[target].ravel()).statistic
            assert rho < RANDOMISED_RHO_BOUND, (entry["image"], target, rho)
            # and the trained model's map is on its structure, not on the background
            assert heat[mask == k].mean() > 5 * heat[mask == 0].mean(), (entry["image"], target)


def test_integrated_gradients_of_each_outcome_add_up_to_what_the_record_changed(one_epoch, train_cohort):
    _, result = one_epoch
    root, _ = train_cohort
    row = pd.read_csv(root / "cohort" / "manifest.csv").iloc[2]
    predictor = Predictor(result.best_dir, device="cpu")
    case = predictor.prepare(root / "cohort" / row["image"], {"age": float(row["age"]), "sex": str(row["sex"]),
                                                              "education_years": float(row["education_years"])})
    image, clinical, voxel_volume, _ = explained_input(predictor, case)  # the training window
    # In float64: the one-epoch model's outputs move by 1e-5 with the record, float32's resolution at an MMSE of 27.
    trained = copy.deepcopy(predictor.models[0]).double()
    image, voxel_volume = image.double(), voxel_volume.double()
    record = type(clinical[0])(clinical[0].numeric.double(), clinical[0].missing, clinical[0].categorical)
    found = clinical_attributions(trained, predictor.schema, image, record, ["mmse", "cdr", "risk"],
                                  predictor.cross, voxel_volume)
    # the volumes from the mask are a step function of the record: held at the patient's (module docstring)
    model = with_held_volumes(trained, image, record, predictor.cross, voxel_volume)
    numeric_names = [f.name for f in predictor.schema.numeric]
    assert set(found) == {"mmse", "cdr", "risk"}
    assert set(found["mmse"]) == set(numeric_names) | {f.name for f in predictor.schema.categorical}
    assert found["mmse"]["apoe4"] == 0.0  # not given: missing is the baseline, so knowing nothing moved nothing

    def output(head, rec):
        with torch.no_grad():
            value = model(image, rec, predictor.cross, voxel_volume).outcomes[head]
        return float(value.sum() if head == "cdr" else value[0])

    unknown = type(record)(torch.zeros_like(record.numeric), torch.ones_like(record.missing), record.categorical)
    for head in ("mmse", "cdr", "risk"):
        total = sum(found[head][n] for n in numeric_names)
        # completeness: the numeric features' attributions sum to f(record) − f(numeric features missing)
        change = output(head, record) - output(head, unknown)
        assert change != 0 and total == pytest.approx(change, rel=1e-5, abs=0), head


def test_jointray_explain_writes_maps_attributions_and_a_report_showing_them(one_epoch, train_cohort, tmp_path):
    _, result = one_epoch
    root, _ = train_cohort
    row = pd.read_csv(root / "cohort" / "manifest.csv").iloc[0]
    image = root / "cohort" / row["image"]
    outcome = CliRunner().invoke(app, ["explain", str(image), "--checkpoint", str(result.best_dir), "--out",
                                       str(tmp_path), "--clinical", json.dumps({"age": float(row["age"])})])
    assert outcome.exit_code == 0, outcome.output
    stem = image.name.removesuffix(".nii.gz")
    written = sorted(p.name for p in tmp_path.iterdir())
    structures = ["anterior", "posterior"]
    assert {f"{stem}_hirescam_{t}.nii.gz" for t in [*structures, "mmse", "cdr", "risk"]} <= set(written), written
    assert f"{stem}_attributions.json" in written and f"{stem}_report.html" in written
    source = nib.load(image)
    heat = nib.load(tmp_path / f"{stem}_hirescam_mmse.nii.gz")
    assert heat.shape == source.shape[:3] and np.allclose(heat.affine, source.affine)
    attributions = json.loads((tmp_path / f"{stem}_attributions.json").read_text())
    assert attributions["mmse"]["sex"] == 0.0 and attributions["mmse"]["age"] != 0.0  # only age was given
    html = (tmp_path / f"{stem}_report.html").read_text()
    sections = re.findall(r'<section id="([^"]+)"', html)
    assert sections == ["review", "segmentation", "outcomes", "explanations", "model"]
    assert html.count("<figcaption>HiResCAM of ") == len(structures) + 3 and "Integrated Gradients" in html

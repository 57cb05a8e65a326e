"""The whole data path: synthetic raw inputs -> construction pipeline -> validator -> loader."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from data.build import build
from data.dataset import RetriBooruDataset, collate
from data.synthetic import generate
from data.validate import validate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, identities=8, images_per_identity=3, size=64, seed=7)
    return root


def _build(root, out, vqa="vqa_answers.jsonl"):
    raw = root / "raw"
    return build(raw / "metadata.jsonl", raw / vqa, raw / "cloth_tags.txt", root / "masks", raw / "face_boxes.jsonl",
                 out, root=root, truth=raw / "identities.jsonl")


def _clusters(path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return {frozenset([r["id"], *r["similar"]]) for r in recs}


def test_built_dataset_recovers_the_identities_exactly(synthetic, tmp_path):
    assert validate(synthetic) == []
    stats = _build(synthetic, tmp_path / "built")
    assert validate(tmp_path / "built") == []
    assert _clusters(tmp_path / "built" / "annotations.jsonl") == _clusters(synthetic / "annotations.jsonl")
    assert stats["truth"]["precision"] == 1.0 and stats["truth"]["recall"] == 1.0
    assert stats["dropped_total"] > 0  # the noise images


def test_answer_errors_are_measured(tmp_path):
    """Wrong VQA answers split identities (samples left alone are dropped) and can merge them; the
    build reports pair precision and recall against the generator's ground truth."""
    generate(tmp_path / "noisy", identities=8, images_per_identity=4, size=48, seed=3, vqa_error_rate=0.3)
    clean = generate(tmp_path / "clean", identities=8, images_per_identity=4, size=48, seed=3)
    stats = _build(tmp_path / "noisy", tmp_path / "built")
    truth = stats["truth"]
    assert 0 <= truth["precision"] <= 1 and 0 <= truth["recall"] <= 1
    assert stats["kept_samples"] < clean["clean"]
    assert validate(tmp_path / "built") == []


@pytest.mark.parametrize("setting,task", [("b", "recon"), ("b", "compose"), ("b", "multi"), ("a", "recon"),
                                          ("a", "compose")])
def test_loader_reads_the_built_dataset(synthetic, tmp_path, setting, task):
    _build(synthetic, tmp_path / "built")
    ds = RetriBooruDataset(tmp_path / "built", resolution=32, k=2, setting=setting, task=task)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["skipped"] == 0 and batch["refs"].shape == (4, 2, 3, 32, 32)
    assert torch.isfinite(batch["image"]).all() and batch["ref_mask"].any()

"""Telling what a conditioning checkpoint holds without building a model (retrinet.inspect_checkpoint),
and loading any of them with load_reference_model."""
import dataclasses
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.weights import CheckpointError
from helpers import randomize_
from retrinet import (ControlNetConfig, ControlNetUNet, RetriNetConfig, RetriUNet, inspect_checkpoint,
                      load_reference_model)
from unet import UNet, UNetConfig

CFG = UNetConfig(model_channels=32, attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2, 2),
                 num_heads=4, context_dim=24)
OTHER = dataclasses.replace(CFG, attention_resolutions=(1,), norm_groups=8)


def _unet(cfg=CFG, seed=0):
    return randomize_(UNet(cfg).eval(), seed=seed)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 8, generator=g), torch.tensor([17, 640]), torch.randn(2, 5, 24, generator=g),
            torch.randn(2, 3, 4, 8, 12, generator=g), torch.randn(2, 3, 3, 24, generator=g))


def test_our_retrinet_file(tmp_path):
    model = RetriUNet(_unet(), heads=2, lock="decoder", null_reference=True)
    randomize_(model.retrinet, seed=3)
    model.save(tmp_path / "r.safetensors")
    info = inspect_checkpoint(tmp_path / "r.safetensors")
    assert (info.method, info.layout, info.lock, info.train_base) == ("retrinet", "ours", "decoder", False)
    assert info.config == RetriNetConfig(heads=2, null_reference=True)
    assert info.base_mismatch(CFG) == {}
    assert info.base_mismatch(OTHER) == {"attention_resolutions": ([2, 1], [1]), "norm_groups": (32, 8)}
    loaded = load_reference_model(tmp_path / "r.safetensors", _unet())
    assert isinstance(loaded, RetriUNet) and loaded.config == model.config and loaded.lock == "decoder"
    x, t, ctx, refs, ref_ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, ctx, refs, ref_ctx), model.eval()(x, t, ctx, refs, ref_ctx))


def test_a_file_whose_metadata_lacks_an_entry_is_refused_naming_it(tmp_path):
    """Every entry `save` writes is required: a file without one is refused in one line that names
    the file and the entries."""
    model = RetriUNet(_unet(), heads=2, null_reference=True)
    randomize_(model.retrinet, seed=4)
    model.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["retrinet"])
    for key in ("method", "config", "lock", "train_base", "unet_config"):
        partial = {k: v for k, v in info.items() if k != key}
        path = tmp_path / f"no-{key}.safetensors"
        save_file(state, str(path), metadata={**meta, "retrinet": json.dumps(partial)})
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: its 'retrinet' metadata lacks {key}$"):
            inspect_checkpoint(path)


def test_controlnet_files_ours_and_official(tmp_path):
    model = ControlNetUNet(_unet(), lock="decoder")
    randomize_(model.control, seed=5)
    model.save(tmp_path / "ours.safetensors")
    info = inspect_checkpoint(tmp_path / "ours.safetensors")
    assert (info.method, info.layout, info.lock, info.config) == ("controlnet", "ours", "decoder", ControlNetConfig())
    state = {k: v.contiguous() for k, v in model.control.state_dict().items()}
    save_file({"control_model." + k: v for k, v in state.items()}, tmp_path / "official.safetensors")
    save_file(state, tmp_path / "bare.safetensors")
    for name in ("official", "bare"):
        info = inspect_checkpoint(tmp_path / f"{name}.safetensors")
        assert (info.method, info.layout, info.lock, info.unet_config) == ("controlnet", "official", "none", None)
        assert info.base_mismatch(CFG) == {}
        diff = info.base_mismatch(OTHER)  # another base: keys appear, vanish or change shape
        assert diff and all(theirs != ours for theirs, ours in diff.values())
        assert isinstance(load_reference_model(tmp_path / f"{name}.safetensors", _unet()), ControlNetUNet)
    hint = torch.rand(2, 3, 128, 64)
    x, t, ctx, _, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(ControlNetUNet.load(tmp_path / "official.safetensors", _unet()).eval()(x, t, ctx, hint),
                           model.eval()(x, t, ctx, hint))


def test_files_that_are_neither(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match=r"junk.safetensors: neither a checkpoint written by train.py .* nor an "
                                              r"official ControlNet file"):
        inspect_checkpoint(tmp_path / "junk.safetensors")
    save_file({"retrinet.x": torch.zeros(2)}, tmp_path / "nometa.safetensors")
    with pytest.raises(CheckpointError, match=r"nometa.safetensors: not a RetriNet checkpoint \(no 'retrinet' metadata"):
        inspect_checkpoint(tmp_path / "nometa.safetensors")
    save_file({"retrinet.x": torch.zeros(2)}, tmp_path / "alien.safetensors", metadata={"retrinet": json.dumps(
        {"method": "lora", "config": {}, "lock": "none", "train_base": False, "unet_config": {}})})
    with pytest.raises(CheckpointError, match=r"alien.safetensors: unknown method 'lora'"):
        inspect_checkpoint(tmp_path / "alien.safetensors")
    save_file({"retrinet.x": torch.zeros(2)}, tmp_path / "badcfg.safetensors", metadata={"retrinet": json.dumps(
        {"method": "retrinet", "config": {"heads": 2, "depth": 3}, "lock": "none", "train_base": False,
         "unet_config": {}})})
    with pytest.raises(CheckpointError, match=r"badcfg.safetensors: bad retrinet config in its metadata"):
        inspect_checkpoint(tmp_path / "badcfg.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.safetensors: no such file"):
        inspect_checkpoint(tmp_path / "missing.safetensors")


def test_checkpoint_files_are_named_for_their_method_and_the_old_name_still_loads(tmp_path):
    """A training checkpoint holds <method>.safetensors; a folder from an earlier version holds every
    method's weights as retrinet.safetensors, which model_file still finds."""
    from training.checkpoints import model_file
    model = ControlNetUNet(_unet(), hint_downscale=1)
    assert model.checkpoint_file() == "controlnet.safetensors"
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    model.save(new / model.checkpoint_file())
    model.save(old / "retrinet.safetensors")
    assert model_file(new, "controlnet") == model_file(new) == new / "controlnet.safetensors"
    assert model_file(old, "controlnet") == model_file(old) == old / "retrinet.safetensors"
    assert inspect_checkpoint(model_file(old)).method == "controlnet"

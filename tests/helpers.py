"""Shared test utilities: random weights for every parameter and a relative-error measure."""
import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter fresh random values, including those initialised to 0 or 1, so that a
    weight loaded into the wrong place (or left at its initial value) changes the output.

    Norm scales are drawn around 1, biases and 1-D vectors around 0, matrices with std 1/sqrt(fan_in)
    so activations stay O(1) through deep stacks.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 0:
                p.copy_(2.0 + 0.5 * r)
            elif p.dim() == 1 and leaf == "weight":  # LayerNorm / GroupNorm scale
                p.copy_(1.0 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                fan_in = p[0].numel()
                p.copy_(r * fan_in ** -0.5)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bench_module(name: str):
    """The script bench/<name>.py as a module (bench/ is scripts, not a package the tests import)."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module

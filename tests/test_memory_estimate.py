"""bench/memory.py, the CUDA training-memory estimate made on the CPU: its tracker against known
allocations, against a measured training step, CUDA's autocast policy on the CPU, ZeRO's shards,
the FLOPs of the CPU's attention kernel, and one SD-size estimate against the 24 GB goal."""
import pytest
import torch
import torch.nn.functional as F

from helpers import bench_module


@pytest.fixture(scope="module")
def memory():
    return bench_module("memory")


def test_tracker_counts_known_allocations_by_category(memory):
    with memory.fake_tensors():
        w = torch.nn.Parameter(torch.randn(300, 7))  # 8400 bytes -> 8704 in 512-byte blocks
        mem = memory.PeakMemory()
        frozen = torch.nn.Linear(1, 1).requires_grad_(False)  # 4 + 4 bytes -> two blocks
        mem.track(frozen)
        layer = torch.nn.Linear(7, 300, bias=False)
        layer.weight = w
        mem.track(layer)
        with mem:
            x = torch.randn(1000, 7)               # 28000 -> 28160, made in the "activations" phase
            y = layer(x)                           # 1.2 MB
            del x
            mem.phase = "backward"
            y.sum().backward()                     # the gradient of w moves to "gradients"
            del y
    assert mem.now["parameters"] == 1024 + 8704 and mem.now["gradients"] == 8704
    assert mem.now["activations"] == 0  # freed
    assert mem.peak_total >= 1024 + 8704 + 28160 + 1200128
    assert mem.peak_total == sum(mem.peak.values())


def test_estimate_matches_a_measured_cpu_step(memory):
    """The tiny preset's fp32 step (forward, backward, clipping, AdamW): fake-tensor estimate against
    the CPU allocator's own running total (torch.profiler), within 1.5%; the measurement also holds
    kernels' internal workspaces, which the estimate leaves out, so it is never below."""
    c = memory.check(memory.TINY)
    assert 0.985 <= c["estimated"] / c["measured"] <= 1.0, c


def test_cuda_autocast_policy_on_the_cpu(memory):
    x = torch.randn(2, 8, 5, 5)
    conv, norm = torch.nn.Conv2d(8, 8, 3), torch.nn.GroupNorm(4, 8)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.float16):
            h = conv(x)
            return h.dtype, norm(h).dtype, F.layer_norm(h, (3,)).dtype, h.softmax(-1).dtype, h.sum().dtype

    cpu = dtypes()
    with memory.cuda_autocast_policy():
        cuda = dtypes()
    assert cpu == (torch.float16,) * 5  # the CPU's own policy leaves norms, softmax and sums in fp16
    assert cuda == (torch.float16,) + (torch.float32,) * 4  # CUDA's runs them in fp32
    assert dtypes() == cpu  # the CPU's policy is back after the block


def test_zero_shard_is_the_largest_of_a_greedy_partition(memory):
    params = [torch.empty(n) for n in (50, 40, 30, 20, 10, 5)]
    shard = memory.zero_shard(params, 2)
    assert sum(p.numel() for p in shard) == 80  # {50, 20, 10} against {40, 30, 5}
    assert memory.zero_shard(params, 1) == sorted(params, key=lambda p: -p.numel())


def test_cpu_attention_flops_are_counted_as_cuda_flash(memory):
    """torch counts CUDA's fused attention kernels, not the CPU's, which the estimate runs."""
    from torch.utils.flop_counter import FlopCounterMode
    b, h, s, d = 2, 3, 64, 16
    q = torch.randn(b, h, s, d, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q)
    with FlopCounterMode(display=False, custom_mapping=memory.CPU_ATTENTION_FLOPS) as forward:
        out = F.scaled_dot_product_attention(q, q, q)
    with FlopCounterMode(display=False, custom_mapping=memory.CPU_ATTENTION_FLOPS) as backward:
        out.sum().backward()
    assert plain.get_total_flops() == 0
    assert forward.get_total_flops() == 2 * (2 * b * h * s * s * d)  # q k^T and p v
    assert backward.get_total_flops() >= 2 * forward.get_total_flops()


@pytest.mark.slow
def test_sd15_retrinet_default_fits_24_gib_with_its_weights_counted_exactly(memory):
    recipe = memory.Recipe("retrinet", "none", 384, 2, "fp32", checkpointing=True)
    est = memory.estimate(recipe)
    assert est["total"] <= 24 * 2 ** 30
    with memory.fake_tensors():
        sd, model = memory.build_sd15(recipe)
        n_all = sum(p.numel() for m in (model, sd.vae, sd.text_encoder) for p in m.parameters())
        assert est["trainable"] == sum(p.numel() for p in model.trainable_parameters())
    assert abs(est["peak"]["parameters"] - 4 * n_all) < 512 * 3000  # fp32, up to one 512-byte block each
    assert abs(est["peak"]["AdamW"] - 8 * est["trainable"]) < 512 * 3000  # two moments, fused: no temporaries

"""bench/machine.py, the machine check of `python -m bench.verify --machine`: its facts on this
CPU-only machine, its recommendations for hand-made GPUs (no GPU, V100, A100, a GPU without a fused
kernel at one head size, a 12 GiB GPU), its report, and `python -m bench.machine` as a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.machine import facts, machine_report, recommend

ROOT = Path(__file__).resolve().parents[1]
HEADS = (40, 80, 160, 64)


def gpu_facts(name, memory_gib, capability, bf16, flash, efficient, cudnn=False, device="cuda"):
    """A facts dict as facts() makes it on a GPU; flash / efficient / cudnn: bool, or {head: bool}."""
    def at(value, head):
        return value.get(head, False) if isinstance(value, dict) else value
    sdpa = {h: {"FLASH_ATTENTION": at(flash, h), "EFFICIENT_ATTENTION": at(efficient, h),
                "CUDNN_ATTENTION": at(cudnn, h)} for h in HEADS}
    return {"torch": torch.__version__, "cuda": "12.4", "cudnn": 90100, "python": "3.11.7", "device": device,
            "gpu": {"name": name, "memory_gib": memory_gib, "capability": capability, "multiprocessors": 80},
            "bf16": bf16, "sdpa": sdpa}


def line(lines, start):
    """The one recommendation line that starts with `start`."""
    found = [x for x in lines if x.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_facts_on_this_machine():
    f = facts("cuda")
    if torch.cuda.is_available():
        assert f["gpu"]["name"] == torch.cuda.get_device_name() and set(f["sdpa"]) == set(HEADS)
    else:
        assert f["gpu"] is None and f["sdpa"] == {} and f["bf16"] is False
    assert f["torch"] == torch.__version__
    assert f["cuda"] == (torch.version.cuda or None)
    assert f["python"] == ".".join(map(str, sys.version_info[:3]))


def test_facts_survive_a_failing_gpu(monkeypatch):
    """CUDA that claims a device but fails every query: no crash, no GPU, every SDPA probe False."""
    def fail(*args, **kwargs):
        raise RuntimeError("simulated CUDA failure")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", fail)
    monkeypatch.setattr(torch, "randn", fail)
    f = facts("cuda:1")
    assert f["device"] == "cuda:1"
    assert f["gpu"] is None and f["bf16"] is False
    assert set(f["sdpa"]) == set(HEADS)
    assert all(not ok for backends in f["sdpa"].values() for ok in backends.values())


def test_no_gpu_recommends_cpu_fp32():
    lines = recommend({"torch": torch.__version__, "cuda": None, "cudnn": None, "python": "3.11.7",
                       "gpu": None, "bf16": False, "sdpa": {}})
    first = line(lines, "--device cpu --precision fp32")
    assert "no CUDA GPU visible" in first and "bf16" in first and "slow" in first
    assert any("impractical on a CPU" in x for x in lines)
    assert not any("--precision bf16" in x or "--precision fp16" in x for x in lines)


@pytest.mark.parametrize("memory_gib", [15.77, 31.74])  # V100 16 GB and 32 GB as torch reports them
def test_v100_trains_fp16_with_the_scaler_never_bf16(memory_gib):
    lines = recommend(gpu_facts("Tesla V100-SXM2", memory_gib, (7, 0), bf16=False, flash=False, efficient=True))
    assert not any("--precision bf16:" in x for x in lines)
    train = line(lines, "train.py --device cuda --precision fp16:")
    assert "GradScaler" in train and "never --precision bf16" in train and "7.0 < 8.0" in train
    assert "sample.py's default on CUDA" in line(lines, "sample.py --device cuda --precision fp16:")
    attention = line(lines, "fp16 attention runs through the fused SDPA kernels")
    assert "(40: EFFICIENT_ATTENTION; 80: EFFICIENT_ATTENTION; 160: EFFICIENT_ATTENTION)" in attention
    assert "FLASH_ATTENTION" not in attention and not any("math kernel" in x for x in lines)
    default = line(lines, "training RetriNet at 384 px, fp32, batch 1, --checkpointing, default lock: ~16.0 GiB")
    if memory_gib < 16:
        assert default.endswith("does not fit in 15.8 GiB")
        advice = line(lines, "less than 16 GiB:")
        assert "LockD (--lock decoder" in advice and "--zero" in advice
    else:
        assert default.endswith("fits in 31.7 GiB")
        assert not any(x.startswith("less than 16 GiB") for x in lines)


def test_a100_trains_bf16_and_samples_fp16():
    lines = recommend(gpu_facts("NVIDIA A100-SXM4-80GB", 79.25, (8, 0), bf16=True, flash=True, efficient=True,
                                device="cuda:0"))
    train = line(lines, "train.py --device cuda:0 --precision bf16:")
    assert "native bf16" in train and "no loss scaling" in train
    line(lines, "sample.py --device cuda:0 --precision fp16:")
    assert not any("train.py --device cuda:0 --precision fp16" in x for x in lines)
    assert "(40: FLASH_ATTENTION, EFFICIENT_ATTENTION; 80: FLASH_ATTENTION, EFFICIENT_ATTENTION; " \
           "160: FLASH_ATTENTION, EFFICIENT_ATTENTION)" in line(lines, "fp16 attention runs through")
    assert line(lines, "training RetriNet at 384 px, fp32, batch 1, --checkpointing, default lock") \
        .endswith("fits in 79.2 GiB")
    assert line(lines, "training RetriNet at 384 px, fp32, batch 1, --checkpointing, LockD (--lock decoder): "
                       "~10.3 GiB").endswith("fits in 79.2 GiB")
    assert "(an estimate)" in line(lines, "sampling at 512 px in fp16: ~4 GiB")
    assert not any("less than 16 GiB" in x for x in lines)


def test_head_size_without_a_fused_kernel_is_named():
    lines = recommend(gpu_facts("some GPU", 24.0, (8, 6), bf16=True, flash={40: True, 80: True, 64: True},
                                efficient={40: True, 80: True, 64: True}))
    missing = line(lines, "no fused SDPA kernel in fp16 at head size 160:")
    assert "falls back to the math kernel" in missing and "set_attention(chunk_size=...)" in missing
    assert "(40: FLASH_ATTENTION, EFFICIENT_ATTENTION; 80: FLASH_ATTENTION, EFFICIENT_ATTENTION)" in \
        line(lines, "fused SDPA kernels at the other head sizes")
    assert not any(x.startswith("fp16 attention runs through") for x in lines)


def test_12_gib_gpu_gets_lockd_or_zero():
    lines = recommend(gpu_facts("a 12 GB GPU", 12.0, (8, 6), bf16=True, flash=True, efficient=True))
    assert line(lines, "training RetriNet at 384 px, fp32, batch 1, --checkpointing, default lock") \
        .endswith("does not fit in 12.0 GiB")
    assert "tight in 12.0 GiB" in line(lines, "training RetriNet at 384 px, fp32, batch 1, --checkpointing, LockD")
    assert line(lines, "less than 16 GiB:") == (
        "less than 16 GiB: train with LockD (--lock decoder, ~10.3 GiB) or with --zero over several GPUs "
        "(the default lock over 2: ~13.0 GiB per process)")
    small = recommend(gpu_facts("an 8 GB GPU", 8.0, (7, 5), bf16=False, flash=False, efficient=True))
    assert "LockD alone does not fit here either" in line(small, "less than 16 GiB:")


def test_report_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU-only machine
    report = machine_report("cuda")
    assert report.startswith("| what | value |\n|---|---|\n")
    assert f"| torch | {torch.__version__} |" in report
    assert "| GPU | no CUDA GPU visible |" in report
    assert "\nRecommended:\n" in report
    assert "\n- --device cpu --precision fp32 for train.py and sample.py: no CUDA GPU visible" in report


def test_report_rows_for_a_gpu(monkeypatch):
    import bench.machine as machine
    monkeypatch.setattr(machine, "facts", lambda device: gpu_facts(
        "NVIDIA A100-SXM4-80GB", 79.25, (8, 0), bf16=True, flash={40: True, 80: True, 64: True}, efficient=True))
    report = machine.machine_report()
    assert "| compute capability | 8.0 |" in report and "| native bf16 | yes |" in report
    assert "| fp16 SDPA, head size 40 (SD, 320 channels) | FLASH_ATTENTION, EFFICIENT_ATTENTION |" in report
    assert "| fp16 SDPA, head size 160 (SD, 1280 channels) | EFFICIENT_ATTENTION |" in report
    assert "| fp16 SDPA, head size 64 (CLIP) | FLASH_ATTENTION, EFFICIENT_ATTENTION |" in report
    assert "- train.py --device cuda --precision bf16:" in report


def test_python_m_bench_machine_prints_the_table():
    run = subprocess.run([sys.executable, "-m", "bench.machine"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, wherever it runs
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("| what | value |\n|---|---|\n| torch | ")
    assert "| GPU | no CUDA GPU visible |" in run.stdout
    assert "- --device cpu --precision fp32" in run.stdout

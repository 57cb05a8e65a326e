"""What this machine has for the repository, and the train.py / sample.py settings that follow.

    .venv/bin/python -m bench.verify --machine     # bench/verify.py prints machine_report()
    .venv/bin/python -m bench.machine              # the same report on its own

facts() gathers, with torch only: the torch / CUDA / cuDNN / Python versions, the GPU (name, memory,
compute capability, multiprocessors), native bf16, and which fused SDPA kernels (flash, memory-
efficient, cuDNN) run in fp16 at Stable Diffusion v1.5's attention head sizes (40, 80, 160: 320,
640 and 1280 channels over 8 heads) and at CLIP's 64. Every GPU probe is guarded: a probe that
fails records False (or None), it never stops the report. recommend() turns the facts into
--device / --precision / --lock advice, each line with its reason; machine_report() renders both
as Markdown. On a machine without a CUDA GPU the report says so and recommends the CPU settings.
"""
from __future__ import annotations

import platform
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SD_HEAD_SIZES = (40, 80, 160)  # SD v1.5's U-Net: 320 / 640 / 1280 channels over 8 heads
CLIP_HEAD_SIZE = 64  # CLIP ViT-L/14's text encoder: 768 channels over 12 heads
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")

# Peak training memory, RetriNet at 384 px, K = 2, fp32, batch 1, --checkpointing, in GiB: the
# estimates of bench/memory.py --goals as BENCHMARKS.md records them ("The memory goals"). They are
# allocated memory; the CUDA context, cuBLAS / cuDNN workspaces (0.5-1 GiB) and the allocator's
# fragmentation (5-15%) come on top.
TRAIN_DEFAULT_LOCK_GIB = 16.0  # default lock (none): 15.98
TRAIN_LOCKD_GIB = 10.3  # LockD, --lock decoder: 10.27
TRAIN_ZERO2_GIB = 13.0  # default lock, --zero over 2 processes, per process: 13.03
# Sampling SD v1.5 at 512 px in fp16, batch 1 with classifier-free guidance: a rough estimate
# (about 2 GiB of fp16 weights for the U-Net, VAE and text encoder, plus activations), not a measurement.
SAMPLE_512_FP16_GIB = 4.0
OVERHEAD_GIB = 1.0  # the CUDA context and workspaces, for "fits" against "tight"
FRAGMENTATION = 1.15  # reserved over allocated memory, at the top of BENCHMARKS.md's 5-15%


def _cuda_index(device: str) -> int | None:
    """The CUDA device index of "cuda" (the current device) or "cuda:N"; None for anything else."""
    try:
        d = torch.device(device)
        if d.type != "cuda":
            return None
        return torch.cuda.current_device() if d.index is None else d.index
    except Exception:  # a malformed device string, or CUDA failing to initialise
        return None


def _cudnn_version() -> int | None:
    """cuDNN's version as torch reports it, or None."""
    try:
        return torch.backends.cudnn.version()
    except Exception:
        return None


def _gpu(index: int) -> dict | None:
    """Name, total memory (GiB), compute capability and multiprocessor count of one GPU, or None."""
    try:
        p = torch.cuda.get_device_properties(index)
        return {"name": p.name, "memory_gib": p.total_memory / 2**30,
                "capability": (p.major, p.minor), "multiprocessors": p.multi_processor_count}
    except Exception:
        return None


def _bf16_native(index: int, capability: tuple[int, int]) -> bool:
    """Native bf16 on GPU `index`: torch's own answer without emulation where it has the keyword,
    else compute capability >= 8.0 (Ampere on; a V100 (7.0) or T4 (7.5) has none)."""
    try:
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation keyword
        return tuple(capability) >= (8, 0)
    except Exception:
        return False


def _sdpa_available(index: int, head: int, backend: str) -> bool:
    """Whether fp16 SDPA (B=1, H=8, L=64, D=head) runs on GPU `index` with only `backend` allowed."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        choice = getattr(SDPBackend, backend)
        q, k, v = (torch.randn(1, 8, 64, head, device=f"cuda:{index}", dtype=torch.float16) for _ in range(3))
    except Exception:  # no sdpa_kernel / backend in this torch, or no tensors on that device
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns why each kernel it skips is unusable
        try:
            with sdpa_kernel([choice]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize(index)
            return True
        except RuntimeError:  # "No available kernel", or a CUDA error in the kernel
            return False


def _sdpa(index: int) -> dict[int, dict[str, bool]]:
    """{head size: {backend: available}} for SD's head sizes and CLIP's, fp16."""
    return {head: {b: _sdpa_available(index, head, b) for b in BACKENDS}
            for head in (*SD_HEAD_SIZES, CLIP_HEAD_SIZE)}


def facts(device: str = "cuda") -> dict:
    """What this machine has: versions, the GPU of `device` ("cuda" = the current one, "cuda:N";
    None without CUDA), native bf16 and the fused fp16 SDPA kernels per head size ({} without a GPU)."""
    out = {"torch": torch.__version__, "cuda": torch.version.cuda or None, "cudnn": _cudnn_version(),
           "python": platform.python_version(), "device": device, "gpu": None, "bf16": False, "sdpa": {}}
    try:
        available = torch.cuda.is_available()
    except Exception:
        available = False
    index = _cuda_index(device) if available else None
    if index is None:
        return out
    out["device"] = f"cuda:{index}"
    out["gpu"] = _gpu(index)
    if out["gpu"] is not None:
        out["bf16"] = _bf16_native(index, out["gpu"]["capability"])
    out["sdpa"] = _sdpa(index)
    return out


def fused_backends(facts: dict, head: int) -> list[str]:
    """The fused SDPA backends available in fp16 at one head size (an empty list if none, or unprobed)."""
    return [b for b, ok in facts.get("sdpa", {}).get(head, {}).items() if ok]


def _fit(need: float, have: float) -> str:
    """Whether `need` GiB of allocated memory fits a card of `have` GiB: "fits", "tight" or "does not fit"."""
    if need * FRAGMENTATION + OVERHEAD_GIB <= have:
        return f"fits in {have:.1f} GiB"
    if need <= have:
        return f"tight in {have:.1f} GiB (the CUDA context, workspaces and fragmentation come on top)"
    return f"does not fit in {have:.1f} GiB"


def _precision_lines(facts: dict) -> list[str]:
    """--device / --precision for train.py and sample.py."""
    gpu, device = facts["gpu"], facts.get("device", "cuda")
    cc = ".".join(map(str, gpu["capability"]))
    sample = (f"sample.py --device {device} --precision fp16: sample.py's default on CUDA, "
              "half the memory of fp32 and the GPU's fp16 tensor cores")
    if facts.get("bf16"):
        train = (f"train.py --device {device} --precision bf16: {gpu['name']} has native bf16 "
                 f"(compute capability {cc} >= 8.0); bf16 keeps fp32's range, so no loss scaling is needed")
    else:
        train = (f"train.py --device {device} --precision fp16: {gpu['name']} has no native bf16 "
                 f"(compute capability {cc} < 8.0), so never --precision bf16 here; fp16's loss is "
                 "scaled by train.py's GradScaler")
    return [train, sample]


def _attention_lines(facts: dict) -> list[str]:
    """Whether SD's fp16 attention runs through fused SDPA kernels, and what to do where it does not."""
    missing = [h for h in SD_HEAD_SIZES if not fused_backends(facts, h)]
    found = "; ".join(f"{h}: {', '.join(fused_backends(facts, h))}"
                      for h in SD_HEAD_SIZES if h not in missing)
    if not missing:
        return [f"fp16 attention runs through the fused SDPA kernels at every SD head size ({found})"]
    sizes = ", ".join(str(h) for h in missing)
    line = (f"no fused SDPA kernel in fp16 at head size {sizes}: SDPA falls back to the math kernel "
            "there (more memory and time); the U-Net's set_attention(chunk_size=...) bounds the memory "
            "of that path")
    return [line] + ([f"fused SDPA kernels at the other head sizes ({found})"] if found else [])


def _memory_lines(facts: dict) -> list[str]:
    """Which of the measured configurations fit in the GPU's memory, and what to use when 16 GiB do not."""
    have = facts["gpu"]["memory_gib"]
    train = "training RetriNet at 384 px, fp32, batch 1, --checkpointing"
    lines = [f"{train}, default lock: ~{TRAIN_DEFAULT_LOCK_GIB:.1f} GiB (bench/memory.py's estimate): "
             f"{_fit(TRAIN_DEFAULT_LOCK_GIB, have)}",
             f"{train}, LockD (--lock decoder): ~{TRAIN_LOCKD_GIB:.1f} GiB: {_fit(TRAIN_LOCKD_GIB, have)}",
             f"sampling at 512 px in fp16: ~{SAMPLE_512_FP16_GIB:.0f} GiB (an estimate): "
             f"{_fit(SAMPLE_512_FP16_GIB, have)}"]
    if have < 16.0:
        advice = (f"less than 16 GiB: train with LockD (--lock decoder, ~{TRAIN_LOCKD_GIB:.1f} GiB) or "
                  f"with --zero over several GPUs (the default lock over 2: ~{TRAIN_ZERO2_GIB:.1f} GiB "
                  "per process)")
        if have < TRAIN_LOCKD_GIB:
            advice += "; LockD alone does not fit here either, so combine it with --zero over several GPUs"
        lines.append(advice)
    return lines


def recommend(facts: dict) -> list[str]:
    """The train.py / sample.py settings that `facts` call for, one short line each with its reason."""
    if facts.get("gpu") is None:
        return ["--device cpu --precision fp32 for train.py and sample.py: no CUDA GPU visible; bf16 "
                "autocast works on the CPU but is slow on most CPUs",
                "an SD-size run (training RetriNet, sampling at 512 px) is impractical on a CPU: "
                "use it for the tiny preset and the tests"]
    return _precision_lines(facts) + _attention_lines(facts) + _memory_lines(facts)


def _rows(facts: dict) -> list[tuple[str, str]]:
    """(what, value) rows of the facts table."""
    rows = [("torch", facts["torch"]), ("CUDA (torch's build)", str(facts["cuda"])),
            ("cuDNN", str(facts["cudnn"])), ("Python", facts["python"])]
    gpu = facts.get("gpu")
    if gpu is None:
        return rows + [("GPU", "no CUDA GPU visible"), ("native bf16", "no (no GPU)"),
                       ("fused SDPA kernels (fp16)", "none probed (no GPU)")]
    rows += [("GPU", f"{gpu['name']} ({facts.get('device', 'cuda')})"),
             ("GPU memory", f"{gpu['memory_gib']:.1f} GiB"),
             ("compute capability", ".".join(map(str, gpu["capability"]))),
             ("multiprocessors", str(gpu["multiprocessors"])),
             ("native bf16", "yes" if facts.get("bf16") else "no")]
    for head in (*SD_HEAD_SIZES, CLIP_HEAD_SIZE):
        where = "CLIP" if head == CLIP_HEAD_SIZE else f"SD, {head * 8} channels"
        fused = ", ".join(fused_backends(facts, head)) or "none (math kernel)"
        rows.append((f"fp16 SDPA, head size {head} ({where})", fused))
    return rows


def machine_report(device: str = "cuda") -> str:
    """This machine's facts as a Markdown (what, value) table, then "Recommended:" and a bullet list."""
    f = facts(device)
    table = ["| what | value |", "|---|---|"] + [f"| {what} | {value} |" for what, value in _rows(f)]
    return "\n".join(table + ["", "Recommended:", ""] + [f"- {line}" for line in recommend(f)])


if __name__ == "__main__":
    print(machine_report())

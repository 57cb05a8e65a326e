"""Peak training memory of the sd15 preset on a CUDA device, estimated on the CPU, and FLOPs per sample.

    .venv/bin/python bench/memory.py                       # the whole table (about 20 min on 2 cores)
    .venv/bin/python bench/memory.py --method retrinet --lock none --resolution 384 --refs 2 \\
        --precision fp32 --checkpointing [--zero 2]        # one row, and "estimated peak: X GiB"
    .venv/bin/python bench/memory.py --goals               # the memory goals, before and after
    .venv/bin/python bench/memory.py --check               # the estimator against a measured CPU step
    .venv/bin/python bench/memory.py --flops               # FLOPs per training sample, and the paper's rate

How. The models are built under FakeTensorMode: every tensor has its shape, dtype and storage size
but no data, so SD-size models cost nothing to build and a training step costs only its Python.
The optimisation step runs as train.py runs it (training.objective.diffusion_loss on a batch of the
recipe's shape: VAE and text encoding, the method's forward and backward, the GradScaler under
fp16, clip_grad_norm_, AdamW as train.py makes it on CUDA (fused), gradients set to None), twice;
the second step, which starts with AdamW's state allocated, is measured by `PeakMemory`, which adds
up the live storages after every operation by category (parameters, buffers, gradients, DDP
buckets, AdamW, activations, the backward's temporaries) and keeps the peak.

Why the CPU device. PyTorch's autograd engine asks the CUDA driver for a stream even for fake
tensors, so a backward pass cannot run on fake CUDA tensors without a GPU. The step therefore runs on
fake CPU tensors, with what differs on CUDA put back:
* autocast: CUDA's policy, not the CPU's. CUDA runs group_norm, layer_norm, softmax, exp, pow,
  sum, upsampling and the losses in fp32 (their outputs, saved for backward, are fp32), the CPU
  leaves them in fp16. `cuda_autocast_policy` registers CUDA's kernels for those ops on the CPU's
  autocast key for the duration of the estimate (the op lists of ATen's autocast_mode.h);
* AdamW: the CUDA build's choice, given explicitly (fused, or with --foreach-adamw torch's CUDA
  default, whose temporaries are the size of all trainable weights);
* attention: the CPU's fused flash kernel, which like CUDA's flash and memory-efficient kernels
  keeps the output and the log-sum-exp, never the score matrix;
* storages are counted in the 512-byte blocks of CUDA's caching allocator.
Left out: the allocator's fragmentation (a real run's reserved memory exceeds its allocated peak,
typically by 5-15%), the CUDA context and cuDNN / cuBLAS workspaces (about 0.5-1 GB), NCCL buffers,
kernels' internal scratch memory.

The anchor: diffusers' ControlNet training step as examples/controlnet/train_controlnet.py sets it
up (ControlNetModel.from_unet trainable in fp32 under fp16 autocast; UNet2DConditionModel, VAE and
text encoder frozen and cast to fp16, the U-Net run without autocast; 512 px, batch 1; AdamW; loss
on model_pred.float(); gradients zeroed, not freed, its default), with and without gradient
checkpointing, estimated the same way in the same run. Our ControlNet under the same settings is the
row to read against it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrinet import LOCKS, METHODS  # noqa: E402

GIB = 2 ** 30

# CUDA's autocast policy for the ops whose CPU policy differs (ATen's autocast_mode.h lists:
# AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE; the lower-precision list the CPU shares for every
# op these models call).
CUDA_FP32 = ["acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
             "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
             "layer_norm", "native_layer_norm", "group_norm", "mse_loss", "l1_loss", "smooth_l1_loss", "logsumexp",
             "upsample_nearest2d", "upsample_nearest2d.vec", "upsample_bilinear2d", "upsample_bilinear2d.vec",
             "upsample_bicubic2d", "cosine_similarity", "cdist", "dist"]
CUDA_FP32_SET_OPT_DTYPE = ["prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "sum",
                           "sum.dim_IntList", "linalg_vector_norm"]


def _lower(x):
    return isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)


def fake_tensors() -> FakeTensorMode:
    """Tensors made inside have shapes, dtypes and storage sizes but no data. (Module.to cannot
    convert them: `cast_` does.)"""
    return FakeTensorMode()


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU autocast with CUDA's op policy (see the module docstring), for as long as the block runs."""
    lib = torch.library.Library("aten", "IMPL")
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def op_of(name):
        base, _, overload = name.partition(".")
        return getattr(getattr(torch.ops.aten, base), overload or "default")

    def fp32(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                cast = lambda x: x.float() if _lower(x) else x  # noqa: E731
                return op(*tree_map(cast, args), **tree_map(cast, kwargs))
        return kernel

    def fp32_set_opt_dtype(op):
        names = [a.name for a in op._schema.arguments]
        at = names.index("dtype")

        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                given = args[at] if len(args) > at else kwargs.get("dtype")
                if _lower(args[0]) and given is None:
                    if len(args) > at:
                        args = args[:at] + (torch.float32,) + args[at + 1:]
                    else:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
        return kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" for the CPU's own
        for name in CUDA_FP32:
            lib.impl(name, fp32(op_of(name)), "AutocastCPU")
        for name in CUDA_FP32_SET_OPT_DTYPE:
            lib.impl(name, fp32_set_opt_dtype(op_of(name)), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


@dataclasses.dataclass
class Recipe:
    """One row: what train.py --preset sd15 would run."""
    method: str = "retrinet"
    lock: str = "none"
    resolution: int = 384
    refs: int = 2
    precision: str = "fp32"      # fp32, or fp16 (autocast, frozen parts in fp16, GradScaler)
    checkpointing: bool = False
    zero: int = 1                # processes sharing AdamW's state (train.py --zero)
    fused_adamw: bool = True     # as train.py on CUDA; False: torch's CUDA default (foreach)
    bucket_views: bool = True    # --zero: gradients as views of DDP's buckets (train.py); False: a copy

    def label(self) -> str:
        k = f", K = {self.refs}" if METHODS[self.method].references is None else ""
        z = f", --zero over {self.zero}" if self.zero > 1 else ""
        z += ", DDP's buckets a second copy of the gradients" if self.zero > 1 and not self.bucket_views else ""
        return (f"{self.method}, lock {self.lock}{k}, {self.resolution} px, {self.precision}, checkpointing "
                f"{'on' if self.checkpointing else 'off'}{z}{'' if self.fused_adamw else ', foreach AdamW'}")


def cast_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """module.to(dtype) for fake tensors (Module.to cannot swap a fake tensor's data): every floating
    parameter and buffer replaced by its cast."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                m._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def build_sd15(recipe: Recipe):
    """SD v1.5's parts and the method's model as train.py sets them up (training.build.random_sd15),
    the frozen parts cast by `cast_` (fake tensors cannot be cast in place)."""
    from training.build import random_sd15

    def fake_frozen_to(sd, model, dtype):
        for part in [sd.vae, sd.text_encoder] + model.frozen_parts():
            cast_(part, dtype)
    return random_sd15(recipe.method, recipe.lock, checkpointing=recipe.checkpointing,
                       half=torch.float16 if recipe.precision != "fp32" else None, cast=fake_frozen_to)


def fake_batch(recipe: Recipe) -> dict:
    """A batch of one sample in the layout of data.dataset.collate."""
    r, k = recipe.resolution, recipe.refs
    return {"index": [0], "size": 1, "image": torch.rand(1, 3, r, r) * 2 - 1, "refs": torch.rand(1, k, 3, r, r) * 2 - 1,
            "ref_mask": torch.ones(1, k, dtype=torch.bool), "valid": torch.ones(1, 1, r, r),
            "face": torch.zeros(1, 1, r, r), "prompt": ["1girl, solo, long hair, smile"],
            "concepts": [["figure"] * k]}


def zero_shard(params: list, processes: int) -> list:
    """The largest share of the trainable parameters one process updates under --zero: torch's
    ZeroRedundancyOptimizer assigns parameters, largest first, to the process holding the fewest."""
    sizes, shards = [0] * processes, [[] for _ in range(processes)]
    for p in sorted(params, key=lambda p: -p.numel()):
        i = sizes.index(min(sizes))
        shards[i].append(p)
        sizes[i] += p.numel()
    return shards[sizes.index(max(sizes))]


class PeakMemory(TorchDispatchMode):
    """The bytes of live tensor storages by category after every operation, and the breakdown at the
    peak of their total. Storages are rounded up to 512 bytes, as CUDA's caching allocator does.
    Categories: what `track` registers (parameters, buffers, optimizer state made before), and what
    operations make, by the phase the caller sets: "activations" (forward), "backward" (gradients of
    activations, activations recomputed by checkpointing), "AdamW" (its state and the step's
    temporaries). A parameter's gradient moves to "gradients" when it is accumulated.
    (torch's MemTracker does this too, but refuses a module called twice in one step, as RetriNet's
    reference encoder and the text encoder are.)"""

    def __init__(self, granularity: int = 512):
        super().__init__()
        self.granularity = granularity
        self.live = WeakIdKeyDictionary()  # storage -> [bytes, category]
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = self.peak_transient = 0
        self.phase = "activations"

    def reset_peak(self) -> None:
        self.peak, self.peak_total, self.peak_transient = dict(self.now), sum(self.now.values()), 0

    def _add(self, storage, category: str) -> None:
        size = -(-storage.nbytes() // self.granularity) * self.granularity
        entry = self.live.get(storage)
        if entry is not None:
            if entry[0] != size:  # resized in place
                self.now[entry[1]] += size - entry[0]
                entry[0] = size
            return
        entry = [size, category]
        self.live[storage] = entry
        self.now[category] = self.now.get(category, 0) + size
        weakref.finalize(storage, self._free, entry)

    def _free(self, entry) -> None:
        self.now[entry[1]] -= entry[0]

    def retag(self, t: torch.Tensor, category: str) -> None:
        entry = self.live.get(t.untyped_storage())
        if entry is not None and entry[1] != category:
            self.now[entry[1]] -= entry[0]
            entry[1] = category
            self.now[category] = self.now.get(category, 0) + entry[0]

    def track(self, *objects) -> None:
        """Register what exists already: modules' parameters and buffers (gradients of trainable ones
        are moved to "gradients" as they are accumulated)."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for t in obj.parameters():
                    self._add(t.untyped_storage(), "parameters")
                    if t.requires_grad:
                        t.register_post_accumulate_grad_hook(lambda p: self.retag(p.grad, "gradients"))
                for t in obj.buffers():
                    self._add(t.untyped_storage(), "buffers")
        self._update()

    def _update(self) -> None:
        total = sum(self.now.values())
        if total > self.peak_total:
            self.peak_total, self.peak = total, dict(self.now)
        self.peak_transient = max(self.peak_transient, self.now.get("activations", 0) + self.now.get("backward", 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, lambda t: self._add(t.untyped_storage(), self.phase), out)
        self._update()
        return out


class Steps:
    """Optimisation steps as train.py's Run.step takes them (one micro-batch each), with AdamW as
    train.py makes it on CUDA (fused) or as torch defaults there (foreach); `mem`, when given,
    follows the phase of each step."""

    def __init__(self, sd, model, recipe: Recipe):
        from training.objective import Conditioning
        self.sd, self.model, self.recipe = sd, model, recipe
        self.params = model.trainable_parameters()
        own = zero_shard(self.params, recipe.zero) if recipe.zero > 1 else self.params
        self.optimizer = torch.optim.AdamW(own, lr=1e-5, weight_decay=1e-2,
                                           **({"fused": True} if recipe.fused_adamw else {"foreach": True}))
        fp16 = recipe.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cpu", enabled=fp16)
        self.amp = torch.autocast("cpu", dtype=torch.float16) if fp16 else contextlib.nullcontext()
        self.text, self.batch = Conditioning(sd), fake_batch(recipe)

    def __call__(self, mem: "PeakMemory | None" = None) -> None:
        from training.objective import diffusion_loss
        phase = (lambda name: setattr(mem, "phase", name)) if mem is not None else (lambda name: None)
        phase("activations")
        with self.amp:
            loss = diffusion_loss(self.model, self.sd, self.sd.schedule, self.text, self.batch, epoch=0, seed=0,
                                  face_weight=METHODS[self.recipe.method].training_defaults["face_weight"],
                                  ref_drop=0.0)
        phase("backward")
        self.scaler.scale(loss).backward()
        phase("AdamW")
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()  # scaler.step(optimizer) but for its found-inf check, which reads a value
        self.scaler.update()
        # One process, or DDP with its own buckets: gradients freed. Views of DDP's buckets: they stay.
        self.optimizer.zero_grad(set_to_none=self.recipe.zero == 1 or not self.recipe.bucket_views)


def estimate(recipe: Recipe) -> dict:
    """The peak of a training step of `recipe` (the second: AdamW's state exists): bytes by category
    at the moment of the peak, the total, the transient peak, and the parameter counts."""
    with fake_tensors(), cuda_autocast_policy():
        sd, model = build_sd15(recipe)
        mem = PeakMemory()
        mem.track(sd.vae, sd.text_encoder, model)
        with mem:
            if recipe.zero > 1 and not recipe.bucket_views:  # DDP's all-reduce buckets, beside the gradients
                mem.phase = "DDP buckets"
                buckets = torch.empty(sum(p.numel() for p in model.trainable_parameters()))  # noqa: F841
            steps = Steps(sd, model, recipe)
            steps(mem)
            mem.reset_peak()
            steps(mem)
    return summary(mem, steps.params)


def summary(mem: "PeakMemory", trainable: list) -> dict:
    n_train = sum(p.numel() for p in trainable)
    return {"peak": mem.peak, "total": mem.peak_total, "transient": mem.peak_transient, "trainable": n_train}


def tiny_model(seed: int = 0):
    """The tiny preset's RetriNet as training.build makes it with --from-scratch (the whole U-Net trains)."""
    from retrinet import MethodOptions, build_model
    from training.presets import build_tiny
    sd = build_tiny(seed)
    return sd, build_model("retrinet", sd.unet, MethodOptions(heads=1, train_base=True))


TINY = Recipe("retrinet", "none", resolution=48, refs=2, precision="fp32")


def check(recipe: Recipe = TINY) -> dict:
    """The estimator against a measurement: the tiny preset's fp32 training step on the CPU (the
    second step), its peak of live tensor bytes estimated with fake tensors (no 512-byte rounding:
    the CPU allocator has none) and measured on real tensors by torch.profiler's memory events (the
    CPU allocator's running total of the bytes allocated during the step, on top of the bytes live
    when it starts: weights, AdamW's state, the cached text embeddings)."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with fake_tensors():
        sd, model = tiny_model()
        mem = PeakMemory(granularity=1)
        mem.track(sd.vae, sd.text_encoder, model)
        with mem:
            steps = Steps(sd, model, recipe)
            steps(mem)
            mem.reset_peak()
            steps(mem)
    estimated = mem.peak_total

    sd, model = tiny_model()
    steps = Steps(sd, model, recipe)
    steps()
    live = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in
                [*model.parameters(), *model.buffers(), *sd.vae.parameters(), *sd.vae.buffers(),
                 *sd.text_encoder.parameters(), *sd.text_encoder.buffers(), *steps.text.cache.values(),
                 *(v for st in steps.optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
                }.values())
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            steps()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    allocated = max((e["Total Allocated"] for e in events if e.get("Device Type") == 0), default=0)
    return {"estimated": estimated, "measured": live + allocated, "live_before": live}


def estimate_diffusers_controlnet(resolution: int = 512, checkpointing: bool = False) -> dict:
    """The anchor: diffusers' train_controlnet.py step (see the module docstring)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL as DAutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFTextConfig, CLIPTextModel as HFTextModel
    with fake_tensors(), cuda_autocast_policy():
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        controlnet = ControlNetModel.from_unet(unet)
        vae = DAutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        text = HFTextModel(HFTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        for m in (vae, unet, text):
            cast_(m.requires_grad_(False), torch.float16)
        controlnet.train()
        if checkpointing:
            controlnet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2, foreach=True)
        scaler = torch.amp.GradScaler("cpu")
        r = resolution
        pixels, hint = torch.rand(1, 3, r, r, dtype=torch.float16), torch.rand(1, 3, r, r, dtype=torch.float16)
        ids = torch.zeros(1, 77, dtype=torch.long)
        mem = PeakMemory()
        mem.track(vae, unet, text, controlnet)
        with mem:
            for step in range(2):
                if step == 1:
                    mem.reset_peak()
                mem.phase = "activations"
                latents = vae.encode(pixels).latent_dist.sample() * 0.18215
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (1,))
                noisy = latents + noise  # add_noise: the same shapes and dtype
                context = text(ids)[0]
                with torch.autocast("cpu", dtype=torch.float16):  # accelerate's wrapper of the prepared ControlNet
                    down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=hint,
                                           return_dict=False)
                pred = unet(noisy, t, encoder_hidden_states=context,
                            down_block_additional_residuals=[s.to(torch.float16) for s in down],
                            mid_block_additional_residual=mid.to(torch.float16)).sample
                loss = F.mse_loss(pred.float(), noise.float())
                mem.phase = "backward"
                scaler.scale(loss).backward()
                mem.phase = "AdamW"
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
                optimizer.step()  # scaler.step(optimizer) but for its found-inf check, which reads a value
                scaler.update()
                optimizer.zero_grad(set_to_none=False)  # train_controlnet.py's default (--set_grads_to_none off)
    return summary(mem, list(controlnet.parameters()))


# -- FLOPs ----------------------------------------------------------------------------------------------

# The paper's RetriNet run (Supp. A.4): 72 V100-hours for 9,000 steps x 8 accumulated samples at 384 px, FP32.
PAPER_SECONDS_PER_SAMPLE = 72 * 3600 / (9000 * 8)
V100_TFLOPS = {"fp32": 15.7, "fp16": 125.0}  # SXM2 peaks: CUDA cores fp32, tensor cores fp16


def _cpu_flash(query, key, value, *args, out_val=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU's fused attention, which the estimate runs, counted as torch counts CUDA's flash attention.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def flops(recipe: Recipe) -> dict:
    """FLOPs of one training sample (torch.utils.flop_counter: matrix products, convolutions and
    attention, forward and backward; AdamW's elementwise work is not counted), the forward alone
    apart: the frozen VAE and text encoders and the method's forward."""
    from torch.utils.flop_counter import FlopCounterMode
    with fake_tensors(), cuda_autocast_policy():
        sd, model = build_sd15(recipe)
        steps = Steps(sd, model, recipe)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as whole:
            steps()
        from training.objective import diffusion_loss
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as forward, torch.no_grad(), \
                steps.amp:
            diffusion_loss(model, sd, sd.schedule, steps.text, steps.batch, epoch=0, seed=0, face_weight=0.0,
                           ref_drop=0.0)
    return {"step": whole.get_total_flops(), "forward": forward.get_total_flops()}


def flops_table() -> list[str]:
    rows = [Recipe("retrinet", "none", 384, 2, "fp32"), Recipe("retrinet", "decoder", 384, 2, "fp32"),
            Recipe("retrinet", "none", 256, 2, "fp16"), Recipe("controlnet", "decoder", 256, 1, "fp16"),
            Recipe("ip-adapter", "decoder", 256, 1, "fp16")]
    out = ["| configuration | forward TFLOPs | forward + backward TFLOPs per sample |", "|---|---|---|"]
    retrinet = None
    for r in rows:
        f = flops(r)
        retrinet = retrinet or f["step"]
        out.append(f"| {r.label()} | {f['forward'] / 1e12:.2f} | {f['step'] / 1e12:.2f} |")
    rate = retrinet / PAPER_SECONDS_PER_SAMPLE
    out += ["", f"The paper's RetriNet run: {PAPER_SECONDS_PER_SAMPLE:.1f} s per sample on a V100 in FP32, so "
                f"{rate / 1e12:.2f} TFLOP/s: {rate / 1e12 / V100_TFLOPS['fp32']:.1%} of a V100's "
                f"{V100_TFLOPS['fp32']} TFLOP/s FP32 peak. Ten times faster ({PAPER_SECONDS_PER_SAMPLE / 10:.2f} s "
                f"per sample) needs {10 * rate / 1e12:.1f} TFLOP/s: {10 * rate / 1e12 / V100_TFLOPS['fp16']:.1%} of "
                f"its {V100_TFLOPS['fp16']:.0f} TFLOP/s FP16 tensor-core peak."]
    return out


CATEGORIES = ["parameters", "buffers", "gradients", "DDP buckets", "AdamW", "activations", "backward"]


def row(label: str, est: dict, anchor: float | None = None) -> str:
    p = est["peak"]
    cells = [f"{p.get(k, 0) / GIB:.2f}" for k in CATEGORIES]
    total = est["total"] / GIB
    ratio = f"{total * GIB / anchor:.2f}" if anchor else ""
    return (f"| {label} | {est['trainable'] / 1e6:.0f} | " + " | ".join(cells) +
            f" | {est['transient'] / GIB:.2f} | **{total:.2f}** | {ratio} |")


HEADER = ("| configuration | trainable M | " + " | ".join(CATEGORIES) +
          " | activations + backward, max | peak GiB | / diffusers |\n|---|---|" + "---|" * (len(CATEGORIES) + 3))


def table_recipes(methods=METHODS, locks=LOCKS) -> list[Recipe]:
    """The full table: method x lock x checkpointing x K (RetriNet) at 384 px fp32 and fp16,
    and 256 px fp16 (the baselines' recipe)."""
    rows = []
    for method in methods:
        for resolution, precision in ((384, "fp32"), (384, "fp16"), (256, "fp16")):
            for lock in [lk for lk in locks if lk in METHODS[method].locks]:
                for ckpt in (False, True):
                    for k in ((1, 2, 4) if METHODS[method].references is None else (1,)):
                        rows.append(Recipe(method, lock, resolution, k, precision, ckpt))
    return rows


# The memory goals: each recipe and the GiB it must fit in (docs/training.md, what fits where).
GOALS = [(Recipe("retrinet", "none", 384, 2, "fp32", True), 24),
         (Recipe("retrinet", "decoder", 384, 2, "fp32", True), 16),
         (Recipe("retrinet", "none", 384, 2, "fp32", True, zero=2), 16)]


def goal_rows(emit) -> None:
    """Each goal as train.py stood before the memory changes (foreach AdamW, DDP's own buckets) and now."""
    emit("| configuration | goal GiB | before: foreach AdamW, DDP's own buckets | now: fused AdamW, gradients as "
         "bucket views | met |\n|---|---|---|---|---|")
    for recipe, goal in GOALS:
        before = estimate(dataclasses.replace(recipe, fused_adamw=False, bucket_views=False))["total"] / GIB
        now = estimate(recipe)["total"] / GIB
        emit(f"| {recipe.label()} | {goal} | {before:.2f} | {now:.2f} | {'yes' if now <= goal else 'no'} |")


def full_table(emit) -> None:
    """The anchor, the goals with the levers that meet them, and every method x lock x checkpointing
    x K at the three recipes."""
    start = time.perf_counter()
    emit("#### diffusers' ControlNet and ours under the same settings\n")
    emit(HEADER)
    anchors = {}
    for ckpt in (False, True):
        anchors[ckpt] = estimate_diffusers_controlnet(512, ckpt)
        emit(row(f"diffusers ControlNet (train_controlnet.py), 512 px, fp16, checkpointing {'on' if ckpt else 'off'}",
                 anchors[ckpt], anchors[ckpt]["total"]))
    for ckpt in (False, True):
        recipe = Recipe("controlnet", "decoder", 512, 1, "fp16", ckpt)
        emit(row(f"ours: {recipe.label()}", estimate(recipe), anchors[ckpt]["total"]))
    emit("\n#### The memory goals\n")
    goal_rows(emit)
    emit("\n#### Every configuration (AdamW fused, as train.py on CUDA)\n")
    emit(HEADER)
    recipes = table_recipes()
    for i, recipe in enumerate(recipes):
        emit(row(recipe.label(), estimate(recipe)))
        print(f"  [{i + 1}/{len(recipes)} rows, {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=list(METHODS), default=None, help="one row (default: the whole table)")
    ap.add_argument("--lock", choices=LOCKS, default=None, help="default: the method's (train.py's)")
    ap.add_argument("--resolution", type=int, default=384)
    ap.add_argument("--refs", type=int, default=None, help="K (default: 2 for RetriNet, 1 for the baselines)")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--zero", type=int, default=1, metavar="N", help="AdamW's state sharded over N processes")
    ap.add_argument("--foreach-adamw", action="store_true",
                    help="AdamW as torch defaults on CUDA (foreach), not fused as train.py makes it")
    ap.add_argument("--flops", action="store_true", help="FLOPs per training sample, and the paper's rate")
    ap.add_argument("--check", action="store_true", help="the estimator against a measured tiny CPU step")
    ap.add_argument("--goals", action="store_true", help="the memory goals alone, before and after the changes")
    ap.add_argument("--report", default=None, metavar="FILE", help="append the output to this Markdown file")
    a = ap.parse_args(argv)
    if a.resolution < 8 or a.resolution % 8:
        ap.error(f"--resolution {a.resolution} must be a positive multiple of 8")
    if a.zero < 1 or (a.refs is not None and a.refs < 1):
        ap.error("--zero and --refs must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    lines = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    if a.flops:
        for line in flops_table():
            emit(line)
    if a.check:
        emit("| tiny RetriNet fp32 step on the CPU | estimated MiB | measured MiB | estimated / measured |")
        emit("|---|---|---|---|")
        for resolution in (48, 96):
            c = check(dataclasses.replace(TINY, resolution=resolution))
            emit(f"| {resolution} px, K = 2, batch 1 | {c['estimated'] / 2**20:.1f} | {c['measured'] / 2**20:.1f} | "
                 f"{c['estimated'] / c['measured']:.4f} |")
    if a.method:
        defaults = METHODS[a.method].training_defaults
        recipe = Recipe(a.method, a.lock or defaults["lock"], a.resolution, a.refs or defaults["refs"], a.precision,
                        a.checkpointing, a.zero, not a.foreach_adamw)
        est = estimate(recipe)
        emit(HEADER)
        emit(row(recipe.label(), est))
        print(f"estimated peak: {est['total'] / GIB:.2f} GiB")  # the line bench/gpu.sh reads
    elif a.goals:
        goal_rows(emit)
    elif not (a.flops or a.check):
        full_table(emit)
    if a.report:
        with open(a.report, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

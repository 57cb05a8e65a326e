"""Training checkpoints: out/checkpoints/step-NNNNNN/ holding the model file (`ReferenceUNet.save`)
and state.pt (step, optimizer, scaler, data position, RNG states, arguments, processes, dataset
size), written atomically; what --resume compares between a checkpoint's run and the new one; and
the log truncation of a resumed run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from common.weights import CheckpointError
from retrinet import METHODS, ReferenceUNet

STATE_KEYS = ("step", "skipped", "data", "optimizer", "scaler", "rng", "args", "processes", "samples")
OLD_MODEL_FILE = "retrinet.safetensors"  # every method's model file in checkpoints of earlier versions


def model_file(ckpt: Path, method: str | None = None) -> Path:
    """The model weights of a checkpoint folder: the file named for its method (`method`, else
    whichever method's file is there), or the name every method's weights had before."""
    names = [METHODS[method].checkpoint_file()] if method else [cls.checkpoint_file() for cls in METHODS.values()]
    for name in names:
        if (Path(ckpt) / name).is_file():
            return Path(ckpt) / name
    return Path(ckpt) / OLD_MODEL_FILE


def checkpoint_dirs(out: Path) -> list[Path]:
    """Finished checkpoints under out/checkpoints, oldest first."""
    root = Path(out) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_checkpoint(out: Path, step: int, model: ReferenceUNet, state: dict, keep: int, ema=None) -> Path:
    """out/checkpoints/step-NNNNNN/{<method>.safetensors, state.pt} (and ema.safetensors, the weight
    average of `ema`, a training.ema.EMA, when given), written under a temporary name
    and renamed, so a crash never leaves a partial checkpoint; only the last `keep` are kept. A
    write that fails (a full disk) removes its temporary folder and raises OSError; the checkpoints
    written before are untouched."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save(tmp / model.checkpoint_file())
        if ema is not None:
            ema.save(model, tmp)
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():  # on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def read_state(path: Path) -> dict:
    """A checkpoint folder's state.pt (tensors memory-mapped, not read into memory); CheckpointError
    naming the file when it is missing, unreadable (truncated, not a torch file) or not a training
    state."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file (a checkpoint folder holds state.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and I/O errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{file}: cannot read it as a training state ({type(e).__name__}: {first}); "
                              f"resume from an earlier checkpoint (--resume FOLDER)") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a train.py training state (missing: {', '.join(missing)})")
    try:
        saved = json.loads(state["args"])
        assert isinstance(saved, dict)
    except (TypeError, ValueError, AssertionError):
        raise CheckpointError(f"{file}: its 'args' entry is not the JSON object train.py writes") from None
    return state


# -- what --resume compares --------------------------------------------------------------------------

# Settings a resumed run must share with its checkpoint, each with what a change would make mean
# something else: the stored weights (the model's shape, which parameters train) or the stored data
# position (epoch and micro-batches consumed on each process: which samples, in which order, in
# batches of which size, on how many processes). `processes` and `samples` are stored beside the
# arguments; `null_reference` is --ref-drop > 0. Everything else may change on resume, with a note: the learning rate, the
# warm-up and the restart period, --clip-grad, --weight-decay, --adam-eps, --prompt-drop, --face-weight, --ref-drop between
# two positive values, --max-steps, --time-limit, --save-every, --keep, --log-every, the validation
# settings, --workers, --device, --precision, --checkpointing, --zero, --ddp-timeout, and the paths
# --data (its size is checked), --val-data, --weights, --config and --image-encoder (a moved file
# keeps its meaning; another base model would not, which a path cannot tell: the note says so).
RESUME_FIXED = {
    "method": "the model's architecture",
    "preset": "the base model and the model's architecture",
    "from_scratch": "the base model (the tiny stack, or a U-Net trained with the method)",
    "heads": "how the reference attention splits its channels",
    "null_reference": "whether the model has a learned null reference",
    "lock": "which parameters train (and the optimizer state's layout)",
    "refs": "K, the references each sample carries",
    "task": "which references the samples carry and, for multi, the batch order",
    "setting": "what the references are (a: views of the target, b: other images)",
    "resolution": "the size the weights were trained at",
    "ref_resolution": "the size of the references the weights were trained on",
    "ref_background": "what the references the weights were trained on show",
    "batch_size": "the stored data position (micro-batches of this size per process)",
    "grad_accum": "the stored data position (micro-batches per step)",
    "processes": "the stored data position (each process's share of the data)",
    "seed": "the stored data position (the shuffling order) and each sample's noise",
    "samples": "the stored data position (epochs of this many samples)",
    "schedule": "the learning-rate schedule the run follows",
}
# Not compared: bookkeeping of the run itself.
RESUME_IGNORED = {"resume", "out", "explicit"}


def run_settings(args: dict, processes: int, samples: int | None) -> dict:
    """The settings of a run as --resume compares them: the arguments, the number of processes, the
    dataset's size and whether the model has a null reference."""
    settings = dict(args, processes=processes, samples=samples)
    if "lr" in args and "schedule" not in args:
        settings["schedule"] = "cosine-restarts"  # the one schedule of runs written before --schedule
    if isinstance(args.get("ref_drop"), (int, float)):
        settings["null_reference"] = args["ref_drop"] > 0
    return settings


def saved_settings(state: dict) -> dict:
    """`run_settings` of the run that wrote `state`."""
    return run_settings(json.loads(state["args"]), state["processes"], state["samples"])


def _show(key: str, settings: dict) -> str:
    if key == "null_reference":
        return f"--ref-drop {settings.get('ref_drop')}"
    if key == "processes":
        return f"{settings[key]} process(es)"
    if key == "samples":
        return f"{settings[key]} samples in --data"
    return f"--{key.replace('_', '-')} {settings[key]}"


def resume_problems(saved: dict, now: dict, ckpt: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of resuming a run of settings `saved` (`saved_settings`) with settings
    `now` (`run_settings`): a problem per RESUME_FIXED setting that differs, a note per other
    argument that differs. A setting either side does not know (None, absent) is not compared."""
    problems, notes = [], []
    differ = [k for k in RESUME_FIXED if saved.get(k) is not None and now.get(k) is not None and saved[k] != now[k]]
    if {"preset", "method"} & set(differ):  # the other differences follow from these
        differ = [k for k in differ if k in ("preset", "method")]
    for key in differ:
        meaning = RESUME_FIXED[key]
        problems.append(f"--resume {ckpt}: this run has {_show(key, now)}, the checkpoint's run had "
                        f"{_show(key, saved)}; that changes {meaning}. Resume with {_show(key, saved)}, or start "
                        f"a fresh run in a new --out")
    for key in sorted(set(saved) & set(now) - set(RESUME_FIXED) - RESUME_IGNORED):
        if saved[key] == now[key]:
            continue
        note = f"{_show(key, now)} (the checkpoint's run had {saved[key]})"
        if key in ("weights", "config", "image_encoder"):
            note += ": the trained weights mean the same only on the same base files"
        notes.append(note)
    return problems, notes


# -- the log of a resumed run -----------------------------------------------------------------------

def truncate_log(path: Path, step: int) -> int:
    """Keep the records of log.jsonl up to `step` (a resumed run logs the later steps again); a line
    that is not a JSON record with a step (the torn last line of a killed run) goes too. Rewritten
    atomically. Returns the number of lines removed."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
        except ValueError:
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped

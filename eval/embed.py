"""CLIP features of image files and texts for the metrics: batched, no autograd, cached on disk.

Images are read from their files, hashed (sha256 of the bytes), decoded and preprocessed exactly as
CLIPImageProcessor does (clip.preprocess: shortest side to the model's input size, bicubic, centre
crop, CLIP mean/std). Texts (prompts, VQA answers) go through CLIP's tokenizer (77 tokens; longer
texts are truncated, and counted). Features are the projected, un-normalised outputs of
CLIPModel.encode_image / encode_text, returned in float32 whatever precision the model runs in.

The cache holds {content hash: feature} per model identity (a hash of the weights file's bytes,
the configs, the tokenizer and the precision), so features from another model or precision are
never mixed in; re-scoring after adding generations only embeds the new files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from clip import CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig, load_clip, preprocess
from common.images import to_rgb
from common.weights import CheckpointError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ loading

def read_clip_config(path: str | Path) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Both tower configs from a transformers CLIPConfig JSON (`text_config`, `vision_config`,
    `projection_dim`), the `config.json` of openai/clip-vit-large-patch14 for instance."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read a CLIP config ({e})") from None
    if not isinstance(raw, dict) or "text_config" not in raw or "vision_config" not in raw:
        raise CheckpointError(f"{path}: expected a CLIPConfig JSON with 'text_config' and 'vision_config'")
    projection = {"projection_dim": raw.get("projection_dim", 512)}  # CLIPConfig's own default
    return (CLIPTextConfig.from_hf({**raw["text_config"], **projection}),
            CLIPVisionConfig.from_hf({**raw["vision_config"], **projection}))


def load_tokenizer(weights: str | Path, tokenizer: str | Path | None = None, max_length: int = 77
                   ) -> tuple[CLIPTokenizer, str]:
    """(tokenizer, its identity): `tokenizer` (a folder with vocab.json + merges.txt), else the one
    in the weights' folder, else the bundled CLIP vocabulary. `max_length`: the text tower's context."""
    folder = Path(tokenizer) if tokenizer else (Path(weights) if Path(weights).is_dir() else Path(weights).parent)
    files = [folder / "vocab.json", folder / "merges.txt"]
    if tokenizer or all(f.is_file() for f in files):
        tok = CLIPTokenizer.from_folder(folder, max_length)   # a missing file fails here, with its name
        return tok, sha256_bytes(b"".join(f.read_bytes() for f in files)) + f"/{max_length}"
    return CLIPTokenizer.default(max_length), f"bundled/{max_length}"


class WeightsHashes:
    """sha256 of weights files, remembered by (path, size, mtime) in a JSON file beside the cache,
    so a 1.7 GB file is read once, not on every run."""

    def __init__(self, file: Path):
        self.file = Path(file)
        try:
            self.known = json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            self.known = {}

    def __call__(self, path: str | Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.known:
            self.known[key] = sha256_file(path)
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(self.file.name + f".{os.getpid()}.partial")
            tmp.write_text(json.dumps(self.known, indent=1))
            os.replace(tmp, self.file)
        return self.known[key]


def model_identity(weights_digest: str, model: CLIPModel, tokenizer_id: str, dtype: torch.dtype) -> str:
    """A short hash naming everything that changes a feature: weights, configs, tokenizer, precision."""
    blob = json.dumps({"weights": weights_digest, "text": asdict(model.text_config), "vision": asdict(model.vision_config),
                       "tokenizer": tokenizer_id, "dtype": str(dtype), "preprocess": "clip-bicubic-centre-crop"},
                      sort_keys=True)
    return sha256_bytes(blob.encode())[:16]


def load_scorer_model(weights: str | Path, config: str | Path | None = None, *, device="cpu",
                      dtype: torch.dtype = torch.float32) -> CLIPModel:
    """CLIP from openai/clip-vit-large-patch14's `model.safetensors` (a file or its folder). Configs:
    `config` (a CLIPConfig JSON), else `config.json` beside the file, else ViT-L/14's."""
    text_cfg, vision_cfg = read_clip_config(config) if config else (None, None)
    return load_clip(weights, text_cfg, vision_cfg, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ features

@torch.inference_mode()
def encode_images(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels (B, 3, S, S) -> float32 image features (B, D), on the model's device/dtype."""
    p = model.visual_projection.weight
    return model.encode_image(pixels.to(p.device, p.dtype)).float().cpu()


@torch.inference_mode()
def encode_texts(model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Texts -> float32 text features (B, D). Over-long texts are truncated silently (see `truncated`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(list(texts))
    return model.encode_text(ids.to(model.visual_projection.weight.device)).float().cpu()


def truncated(tokenizer: CLIPTokenizer, text: str) -> bool:
    """Whether `text` has more tokens than fit between BOS and EOS."""
    return len(tokenizer.encode(text)) > tokenizer.max_length - 2


class EmbeddingCache:
    """{key: feature} on disk under `folder/<identity>/`, as safetensors shards. `flush` writes the
    entries added since the last flush as a new shard, so an interrupted run keeps what it embedded."""

    def __init__(self, folder: str | Path, identity: str):
        self.dir = Path(folder) / identity
        self.entries: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}
        for shard in sorted(self.dir.glob("*.safetensors")):
            try:
                self.entries.update(load_file(shard))
            except Exception:  # a shard cut short by a crash: its entries are simply embedded again
                continue

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor | None:
        return self.entries.get(key)

    def put(self, key: str, feature: torch.Tensor) -> None:
        self.entries[key] = self.pending[key] = feature.detach().float().cpu().clone()

    def flush(self) -> None:
        if not self.pending:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{os.getpid()}.safetensors"
        tmp = self.dir / f".{name}.partial"
        save_file(self.pending, tmp)
        os.replace(tmp, self.dir / name)
        self.pending = {}


class _NoCache(EmbeddingCache):
    def __init__(self):
        self.entries, self.pending = {}, {}

    def flush(self) -> None:
        self.pending = {}


def _prefetch(pool: ThreadPoolExecutor, fn, items: list, window: int):
    """`map(fn, items)` in order on `pool`, with at most `window` results waiting (bounded memory)."""
    queue = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= window:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


class FeatureExtractor:
    """CLIP features of image files and of texts, batched, with an optional on-disk cache.

    `stats` counts what was embedded and what came from the cache; `unreadable` maps each image
    file that could not be read or decoded to the reason."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, *, cache: EmbeddingCache | None = None,
                 batch_size: int = 32, workers: int = 4, flush_every: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.cache = cache if cache is not None else _NoCache()
        self.batch_size, self.workers, self.flush_every = batch_size, workers, flush_every
        self.size = model.vision_config.image_size
        self.stats = dict(images_embedded=0, images_cached=0, texts_embedded=0, texts_cached=0, texts_truncated=0)
        self.unreadable: dict[Path, str] = {}

    def _read(self, path: Path):
        """(path, cache key, pixels or None if cached, error or None); runs in a worker thread."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            return path, None, None, f"cannot read the file ({e.strerror or e})"
        key = "image:" + sha256_bytes(data)
        if key in self.cache:
            return path, key, None, None
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = preprocess(to_rgb(im, str(path)), size=self.size)[0]
        except UnidentifiedImageError:
            return path, None, None, "cannot decode it as an image (not an image format PIL reads)"
        except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
            return path, None, None, f"cannot decode it as an image ({type(e).__name__}: {e})"
        return path, key, pixels, None

    def images(self, paths, progress=None) -> dict[Path, torch.Tensor]:
        """{path: feature (D,)} for every readable file of `paths` (each read once); the others go
        to `self.unreadable`. `progress(done, total)` is called after each batch."""
        paths = list(dict.fromkeys(paths))
        keys, batch = {}, {}  # batch: {key: pixels} waiting for the encoder

        def run_batch():
            feats = encode_images(self.model, torch.stack(list(batch.values())))
            for key, f in zip(batch, feats):
                self.cache.put(key, f)
            self.stats["images_embedded"] += len(batch)
            batch.clear()
            if len(self.cache.pending) >= self.flush_every:
                self.cache.flush()

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for done, (path, key, pixels, error) in enumerate(_prefetch(pool, self._read, paths, 2 * self.batch_size), 1):
                if error is not None:
                    self.unreadable[path] = error
                    continue
                keys[path] = key
                if pixels is None or key in self.cache or key in batch:  # seen before, or same bytes queued
                    self.stats["images_cached"] += 1
                    continue
                batch[key] = pixels
                if len(batch) == self.batch_size:
                    run_batch()
                    if progress and done < len(paths):
                        progress(done, len(paths))
        if batch:
            run_batch()
        self.cache.flush()
        if progress:
            progress(len(paths), len(paths))
        return {p: self.cache.get(k) for p, k in keys.items()}

    def texts(self, texts, progress=None) -> dict[str, torch.Tensor]:
        """{text: feature (D,)} for each distinct text."""
        texts = list(dict.fromkeys(texts))
        keys = {t: "text:" + sha256_bytes(t.encode("utf-8")) for t in texts}
        self.stats["texts_truncated"] += sum(truncated(self.tokenizer, t) for t in texts)
        todo = [t for t in texts if keys[t] not in self.cache]
        self.stats["texts_cached"] += len(texts) - len(todo)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for t, f in zip(chunk, encode_texts(self.model, self.tokenizer, chunk)):
                self.cache.put(keys[t], f)
            self.stats["texts_embedded"] += len(chunk)
            if len(self.cache.pending) >= self.flush_every:
                self.cache.flush()
            if progress:
                progress(min(i + self.batch_size, len(todo)), len(todo))
        self.cache.flush()
        return {t: self.cache.get(keys[t]) for t in texts}

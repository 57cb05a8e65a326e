"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library.

The vocabulary is OpenAI's (openai/CLIP `simple_tokenizer.py`): 256 byte characters, the same 256
with the end-of-word marker `</w>`, 48,894 merges, then `<|startoftext|>` (49406) and
`<|endoftext|>` (49407). Text is NFC-normalised, runs of whitespace collapse to one space, and
everything is lower-cased before the pre-tokenizer regex splits it into words.

Stable Diffusion v1.5 calls it with `padding="max_length", max_length=77, truncation=True`: every
prompt becomes BOS, its tokens, EOS, padded with EOS to 77 ids; over-long prompts keep the first 75
tokens so that EOS stays last.
"""
from __future__ import annotations

import gzip
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BUNDLED_MERGES = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # the slice openai/CLIP takes from the merges file
# Contractions, runs of letters, single digits, runs of other non-space symbols (openai's regex;
# the special tokens are matched first by the tokenizer's added-token pass).
_WORD_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable bytes map to themselves and come first; the rest map to chr(256 + n) in byte order.
    The dict's order is the order of the first 256 vocabulary entries.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


@lru_cache(maxsize=1)
def bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) rebuilt from the bundled OpenAI merges file, exactly as SD's tokenizer/."""
    lines = gzip.open(BUNDLED_MERGES, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(m) for m in merges]
    symbols += [BOS, EOS]
    return {s: i for i, s in enumerate(symbols)}, merges


def write_vocab_files(folder: str | Path) -> tuple[Path, Path]:
    """Write the bundled vocabulary as `vocab.json` + `merges.txt` (the layout of SD's tokenizer/)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bundled_vocab()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


class CLIPTokenizer:
    """`tok(prompts) -> LongTensor (B, max_length)`: BOS, tokens, EOS, padded with EOS."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77):
        for special in (BOS, EOS):
            if special not in vocab:
                raise ValueError(f"CLIP vocabulary has no {special!r} token")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        tok = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORD_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Registered as special tokens so that a literal "<|endoftext|>" in a prompt maps to its id.
        tok.add_special_tokens([BOS, EOS])
        self._tok = tok
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_id = self.eos_id  # SD v1.x pads with EOS
        self.max_length = max_length
        self.vocab_size = len(vocab)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, max_length: int = 77) -> "CLIPTokenizer":
        """Load SD's `tokenizer/vocab.json` + `tokenizer/merges.txt`."""
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        for path in (vocab_json, merges_txt):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab_json}: not a JSON vocabulary ({e})") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_json}: expected a JSON object mapping tokens to ids")
        merges = []
        for n, line in enumerate(merges_txt.read_text(encoding="utf-8").splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"{merges_txt}:{n}: expected two symbols per merge, got {line!r}")
            merges.append(tuple(pair))
        return cls(vocab, merges, max_length)

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 77) -> "CLIPTokenizer":
        """Load a diffusers-style `tokenizer/` folder."""
        folder = Path(folder)
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", max_length)

    @classmethod
    def default(cls, max_length: int = 77) -> "CLIPTokenizer":
        """The tokenizer of CLIP ViT-L/14 / SD v1.5, from the bundled OpenAI merges file."""
        vocab, merges = bundled_vocab()
        return cls(vocab, merges, max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS, padding or truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens dropped, words separated by spaces."""
        ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id)]
        pieces = [self._tok.id_to_token(i) for i in ids]
        return self._tok.decoder.decode(pieces).replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        n = self.max_length - 2  # room for the prompt's own tokens
        out = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        out[:, 0] = self.bos_id
        for row, (prompt, enc) in enumerate(zip(prompts, self._tok.encode_batch(prompts, add_special_tokens=False))):
            ids = enc.ids
            if len(ids) > n:
                preview = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"prompt truncated to {self.max_length} tokens, {len(ids) - n} tokens dropped: "
                              f"{preview!r}", stacklevel=2)
                ids = ids[:n]
            out[row, 1:len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
            out[row, len(ids) + 1] = self.eos_id
        return out

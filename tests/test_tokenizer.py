"""CLIPTokenizer: ids equal transformers' CLIPTokenizer (SD v1.5 settings) on the bundled vocabulary."""
import random
import warnings

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from clip import CLIPTokenizer
from clip.tokenizer import write_vocab_files

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    " ",
    "   Hello,   WORLD!!!   ",
    "1girl, solo, long hair, looking at viewer, smile, blue eyes, (masterpiece:1.2), [sketch]",
    "don't you'll I'M they're we've she'd it's O'Neil's",
    "Ångström café naïve Ñandú Zürich façade",
    "e\u0301 vs \u00e9 (combining accent vs precomposed)",
    "🤖🎨 emoji 👍🏽 👩‍👩‍👧 flags 🇯🇵",
    "123456 3.14159 -42 1e10 0x1F 2024-11-27",
    "<|endoftext|> inside a prompt <|startoftext|>",
    "<|ENDOFTEXT|> upper-case special",
    "tab\tnew\nline\r\nand\u00a0nbsp",
    "ＡＢＣ full-width ｱｲｳ",
    "日本語のテキストと漢字",
    "Привет мир, γειά σου κόσμε, مرحبا",
    "a--b__c..d//e\\\\f@@g##h$$i%%j^^k&&l**m",
    "\"quoted\" 'single' `back` «guillemets»",
    "word " * 100,
    "x" * 500,
    "a, " * 37 + "end",  # BOS + 75 tokens + EOS: fills exactly 77
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab, merges = write_vocab_files(folder)
    hf = HFCLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>")
    return CLIPTokenizer.default(), hf, folder


def _hf_ids(hf, prompts):
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_known_ids_from_openai():
    # Ids published for SD v1.5 / openai CLIP (shared/reference/sd15_formats.md, section 3.3).
    ids = CLIPTokenizer.default()(["a photograph of an astronaut riding a horse"])
    expected = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == expected
    assert (ids[0, 10:] == 49407).all()


def test_bundled_files_have_official_sizes(tokenizers):
    # The official SD v1.5 tokenizer/vocab.json and merges.txt are 1,059,962 and 524,619 bytes.
    _, _, folder = tokenizers
    assert (folder / "vocab.json").stat().st_size == 1_059_962
    assert (folder / "merges.txt").stat().st_size == 524_619


def test_ids_equal_transformers(tokenizers):
    ours, hf, _ = tokenizers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    ref = _hf_ids(hf, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert got[i].tolist() == ref[i].tolist(), f"prompt {prompt!r}"


def test_ids_equal_transformers_on_random_text(tokenizers):
    ours, hf, _ = tokenizers
    rng = random.Random(1234)
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                + list(" \t\n  .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + list("éÉñßøåçüÆœ\u0301\u0308")
                + list("日本語漢字ひらがなカタカナ한국어") + list("αβγδЖЩю") + ["😀", "🎨", "👍🏽", "\u200d", "\u00a0"]
                + ["'s", "'ll", "'t", "<|endoftext|>"])
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(300)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(prompts)
    ref = _hf_ids(hf, prompts)
    bad = [p for i, p in enumerate(prompts) if got[i].tolist() != ref[i].tolist()]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}"


def test_truncation_keeps_eos_last_and_warns_once_per_prompt():
    tok = CLIPTokenizer.default()
    exact = "a, " * 37 + "end"  # 75 tokens: fits without truncation
    over = "word " * 100         # 100 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok([exact, over, "short"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "25 tokens dropped" in messages[0], messages
    assert ids[0, -1] == tok.eos_id and ids[0, -2] != tok.eos_id  # exactly full
    assert ids[1, 0] == tok.bos_id and ids[1, -1] == tok.eos_id
    assert (ids[1, 1:-1] == tok.encode("word")[0]).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok([exact + " x"])
    assert [str(w.message).split(",")[1].strip() for w in caught] == ["1 tokens dropped: 'a"]


def test_from_files_and_folder_equal_default(tokenizers):
    ours, _, folder = tokenizers
    from_files = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    from_folder = CLIPTokenizer.from_folder(folder)
    prompts = PROMPTS[:8]
    assert torch.equal(from_files(prompts), ours(prompts))
    assert torch.equal(from_folder(prompts), ours(prompts))


def test_single_string_and_decode():
    tok = CLIPTokenizer.default()
    ids = tok("A Cat, sitting!")
    assert ids.shape == (1, 77)
    assert tok.decode(ids[0]) == "a cat , sitting !"


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(ValueError, match="<\\|startoftext\\|>"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(TypeError, match="strings"):
        CLIPTokenizer.default()(["ok", 3])

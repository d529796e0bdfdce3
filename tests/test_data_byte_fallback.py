"""The LLaMA-style tokenizer trained on a corpus (`opt-ds preprocess --vocab-size N --tokenizer-kind
byte-fallback`): a BPE with byte fallback and LLaMA's special ids, saved as tokenizer.json +
tokenizer_config.json; any text round-trips through it, transformers loads it with the same ids, and a
dataset preprocessed with it passes the training vocabulary check."""
import argparse
import json

import pytest

from conftest import bundled_texts
from opt_ds.data import cli
from opt_ds.data.datasets import DataError, DatasetFiles, build_datasets, check_corpora
from opt_ds.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from opt_ds.data.tokenizer import BYTE_PIECES, HFTokenizer, load_tokenizer, train_byte_fallback_bpe

VOCAB = 600
SAMPLES = [
    "ROMEO. But soft, what light through yonder window breaks?",
    "Grüße, 日本語のテキスト, emoji 🎭🤖 and a flag 🇺🇦",
    "tabs\tand  double  spaces,\r\nCRLF, a NUL \x00, trailing space ",
    "combining e\u0301, zero width\u200bjoiner, Ω≈ç√∫",
    "the strings </s>, <s> and <unk> inside a text are text",
]


@pytest.fixture(scope="module")
def texts():
    return bundled_texts(8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, texts):
    directory = tmp_path_factory.mktemp("bf") / "tok"
    tok = train_byte_fallback_bpe(texts[:3], VOCAB, directory)
    return directory, tok


def test_llama_layout_and_special_ids(trained):
    directory, tok = trained
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert isinstance(tok, HFTokenizer) and isinstance(load_tokenizer(directory), HFTokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)   # LLaMA's; no <pad>: eos pads
    assert tok.vocab_size == VOCAB
    raw = tok._tok
    assert [raw.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [raw.token_to_id(t) for t in BYTE_PIECES] == list(range(3, 259))   # <0x00>..<0xFF>
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    model = json.loads((directory / "tokenizer.json").read_text())["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] and model["unk_token"] == "<unk>"


@pytest.mark.parametrize("text", SAMPLES)
def test_any_text_round_trips(trained, text):
    tok = trained[1]
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 1 and 0 not in ids          # never <unk>: unseen characters become byte pieces
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_unseen_characters_are_their_utf8_bytes(trained):
    tok = trained[1]
    for char in ("🎭", "語"):
        ids = tok.encode(char)
        assert ids[-len(char.encode()):] == [3 + b for b in char.encode("utf-8")]
    assert tok.encode("</s>") != [2]                 # a document cannot forge the separator


def test_transformers_gives_the_same_ids(trained, texts):
    from transformers import AutoTokenizer, LlamaTokenizerFast
    directory, ours = trained
    auto = AutoTokenizer.from_pretrained(str(directory))
    fast = LlamaTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (1, 2, 0)
    samples = [s for s in SAMPLES if "</s>" not in s] + [texts[5][:4000], texts[6][-3000:]]
    for text in samples:
        ids = ours.encode(text)
        assert auto.encode(text, add_special_tokens=False) == ids
        assert fast.encode(text, add_special_tokens=False) == ids
        assert auto.encode(text) == ours.encode(text, add_bos=True)            # LLaMA prepends <s>
        assert auto.decode(ids) == ours.decode(ids)
    split = AutoTokenizer.from_pretrained(str(directory), split_special_tokens=True)
    assert split.encode(SAMPLES[-1], add_special_tokens=False) == ours.encode(SAMPLES[-1])


def test_retraining_replaces_the_directory(tmp_path, texts):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "vocab.json").write_text("{}")           # a stale file of another kind
    tok = train_byte_fallback_bpe([texts[0][:20000]], 300, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert tok.vocab_size <= 300 and tok.decode(tok.encode(SAMPLES[1])) == SAMPLES[1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging left behind


def _preprocess_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([*argv, "--workers", "1", "--no-progress"]))


def test_preprocess_option_and_the_vocabulary_check(texts, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t[:6000]}) + "\n" for t in texts[:6]))
    prefix = tmp_path / "c"
    assert _preprocess_cli(str(source), "--output-prefix", str(prefix), "--vocab-size", str(VOCAB),
                           "--tokenizer-kind", "byte-fallback") == 0
    assert "trained byte-fallback (asked 600)" in capsys.readouterr().out
    summary = json.loads(DatasetFiles.of(prefix).summary.read_text())
    assert (summary["tokenizer"]["bos_id"], summary["tokenizer"]["eos_id"]) == (1, 2)
    vocab_size = summary["tokenizer"]["vocab_size"]
    assert vocab_size <= VOCAB
    saved = load_tokenizer(DatasetFiles.of(prefix).tokenizer)
    assert isinstance(saved, HFTokenizer) and saved.decode(saved.encode(SAMPLES[1])) == SAMPLES[1]
    assert check_corpora([(prefix, 1.0)], "98,2,0", 0, vocab_size=vocab_size)[3] == vocab_size
    with pytest.raises(DataError, match=f"vocabulary of {vocab_size} entries, more than vocab_size=512"):
        build_datasets([(prefix, 1.0)], "98,2,0", 16, 1, 4, 0, vocab_size=512)


def test_the_kind_goes_only_with_vocab_size(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "hello world"}) + "\n")
    with pytest.raises(PreprocessError, match="--tokenizer-kind, one of byte-level, byte-fallback, goes only"):
        preprocess(PreprocessConfig(inputs=[str(source)], output_prefix=str(tmp_path / "c"), tokenizer="opt",
                                    tokenizer_kind="byte-fallback"), progress=False)

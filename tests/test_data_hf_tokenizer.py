"""Hugging Face tokenizer.json (how LLaMA tokenizers ship): its own special ids, the same ids as transformers'
tokenizer on the same file, and `opt-ds preprocess` with it; a corpus whose vocabulary exceeds the model's
is refused."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import bundled_texts
from opt_ds.data.datasets import DataError, DatasetFiles, build_datasets
from opt_ds.data.preprocess import PreprocessConfig, preprocess
from opt_ds.data.tokenizer import HFTokenizer, TokenizerError, load_tokenizer

TEXT = "ROMEO. But soft, what light through yonder window breaks? Grüße 🎭"


@pytest.fixture(scope="module")
def texts():
    return bundled_texts(20)


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory, texts):
    """A LLaMA-style tokenizer.json: BPE with byte fallback, <unk>=0, <s>=1, </s>=2, SentencePiece spaces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>",
                                                                                          *byte_tokens]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_special_ids_are_the_tokenizers_own(llama_style):
    tok = load_tokenizer(llama_style)
    assert isinstance(tok, HFTokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)     # no <pad>: eos pads
    assert tok.vocab_size == 700
    ids = tok.encode(TEXT, add_bos=True)
    assert ids[0] == 1 and tok.decode(ids) == TEXT        # byte fallback: unseen characters round-trip


def test_same_ids_as_transformers(llama_style, texts):
    from transformers import PreTrainedTokenizerFast
    reference = PreTrainedTokenizerFast(tokenizer_file=str(llama_style))
    ours = load_tokenizer(llama_style.parent)          # the directory works too
    for text in (TEXT, texts[3][:3000]):
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_tokenizer_config_names_the_special_tokens(llama_style, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(llama_style.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<s>"},
                                                                "bos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, 1)


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="cannot tell its end-of-document token; put a tokenizer_config.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_preprocess_with_it_and_a_model_vocabulary_too_small(llama_style, texts, tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:6]))
    summary = preprocess(PreprocessConfig(inputs=[str(source)], output_prefix=str(tmp_path / "c"),
                                          tokenizer=str(llama_style), workers=1), progress=False)
    assert summary["tokenizer"]["eos_id"] == 2 and summary["tokenizer"]["vocab_size"] == 700
    saved = load_tokenizer(DatasetFiles.of(tmp_path / "c").tokenizer)
    assert saved.encode(TEXT) == load_tokenizer(llama_style).encode(TEXT)
    with pytest.raises(DataError, match="vocabulary of 700 entries, more than vocab_size=512"):
        build_datasets([(tmp_path / "c", 1.0)], "98,2,0", 16, 1, 4, 0, vocab_size=512)

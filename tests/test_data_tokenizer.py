"""The byte-level BPE tokenizer: OPT's ids, lossless round trips, training with OPT's special-token ids."""
import gzip
import itertools
import json
from pathlib import Path

import pytest

from opt_ds.data.sources import BUNDLED_CORPUS
from opt_ds.data.tokenizer import OPT_TOKENIZER_DIR, BPETokenizer, TokenizerError, train_bpe

REPO = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER = REPO.parent / "shared" / "assets" / "opt-tokenizer"
TRICKY = "Grüße, 東京! naïve café — emoji 🎭\r\nTabs\tand  spaces </s><pad> <unk>\n\n"


@pytest.fixture(scope="module")
def opt():
    return BPETokenizer.load("opt")


def test_opt_ids_match_opt_tokenizer(opt):
    # roberta-base's ids for this sentence (same vocabulary); OPT prepends </s> (2) as BOS.
    assert opt.encode("Hello, my dog is cute") == [31414, 6, 127, 2335, 16, 11962]
    assert opt.encode("Hello, my dog is cute", add_bos=True) == [2, 31414, 6, 127, 2335, 16, 11962]
    assert (opt.vocab_size, opt.bos_id, opt.pad_id, opt.eos_id, opt.unk_id) == (50265, 2, 1, 2, 3)


@pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason="../shared/assets/opt-tokenizer not present")
def test_bundled_files_are_byte_identical_to_shared_copy():
    for name in ("gpt2-vocab.json", "gpt2-merges.txt", "LICENSE.md"):
        assert (OPT_TOKENIZER_DIR / name).read_bytes() == (SHARED_TOKENIZER / name).read_bytes(), name


def test_round_trip_is_lossless_and_special_strings_stay_text(opt):
    ids = opt.encode(TRICKY)
    assert opt.decode(ids) == TRICKY
    assert not {0, 1, 2, 3} & set(ids)  # "</s>" written in a document is text, not a separator
    assert opt.decode([2, *opt.encode("Hi"), 2]) == "Hi"  # special ids are skipped when decoding
    assert opt.encode_batch(["a b", TRICKY]) == [opt.encode("a b"), ids]


def test_train_bpe_on_bundled_corpus_keeps_opt_special_ids(tmp_path):
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, 30)]
    trained = train_bpe(texts, 1000, tmp_path / "bpe")
    assert trained.vocab_size == 1000
    vocab = json.loads((tmp_path / "bpe" / "vocab.json").read_text())
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tmp_path / "bpe" / "merges.txt").is_file()
    for text in (texts[0], TRICKY):  # bytes never seen in training still round-trip
        assert trained.decode(trained.encode(text)) == text
    assert len(trained.encode(texts[0])) < len(texts[0].encode()) / 2  # it did learn merges
    reloaded = BPETokenizer.load(tmp_path / "bpe")
    assert reloaded.encode(texts[1][:2000]) == trained.encode(texts[1][:2000])


def test_bad_tokenizers_are_refused_with_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="too small.*at least 260"):
        train_bpe(["abc"], 100, tmp_path / "x")
    with pytest.raises(TokenizerError, match="expected vocab.json and merges.txt"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="does not use OPT's special-token ids"):
        BPETokenizer.load(tmp_path)

"""Train/valid datasets via megatron-core: blending by weight, document-disjoint splits, cached indices,
the SyntheticTokens sample interface, and the same samples under torch.distributed with two gloo ranks."""
import hashlib
import json
import re
import shutil
import textwrap
from collections import Counter

import pytest
import torch

from multiproc import torchrun
from opt_ds.data.datasets import (DEFAULT_SPLIT_SEED, DataError, build_datasets, corpus_stats, dataset_tokenizer,
                                  describe_split, split_documents)
from opt_ds.data.preprocess import PreprocessConfig, preprocess

SEQ = 32
MARK = re.compile(r"\[([AB])(\d+)\]")
ENGLISH = "the quick brown fox jumps over a lazy dog while rain falls".split()
GREEK = "ο γρήγορος καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο".split()


def corpus(tmp_path, name, words, documents=120):
    """Documents whose every few words repeat a marker [<name><doc number>], so any window of SEQ tokens
    names the documents it was cut from."""
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in range(documents):
            body = " ".join(f"[{name}{d}] " + " ".join(words[(d + i + j) % len(words)] for i in range(2))
                            for j in range(8))
            f.write(json.dumps({"text": body}, ensure_ascii=False) + "\n")
    prefix = tmp_path / name
    preprocess(PreprocessConfig(inputs=[str(path)], output_prefix=str(prefix), tokenizer="opt"), progress=False)
    return prefix


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpora")
    return corpus(tmp, "A", ENGLISH), corpus(tmp, "B", GREEK)


def build(corpora, cache, blend=((0, 3.0), (1, 1.0)), split="90,10,0", train=800, valid=100, **kwargs):
    return build_datasets([(corpora[i], w) for i, w in blend], split, SEQ, 1234, train, valid, cache,
                          vocab_size=50272, **kwargs)


def documents_in(dataset, tokenizer) -> list[set]:
    return [set(MARK.findall(tokenizer.decode(dataset[i]["tokens"]))) for i in range(len(dataset))]


def test_blend_3_to_1_and_document_disjoint_valid_split(corpora, tmp_path):
    train, valid = build(corpora, tmp_path / "cache")
    tokenizer = dataset_tokenizer(corpora[0])
    train_docs, valid_docs = documents_in(train, tokenizer), documents_in(valid, tokenizer)
    assert all(len({name for name, _ in docs}) == 1 for docs in train_docs + valid_docs)  # never mixes corpora
    share = Counter(next(iter(docs))[0] for docs in train_docs)
    assert len(train) >= 800 and abs(share["A"] / len(train) - 0.75) < 0.02, share
    assert len(valid) >= 20 and abs(Counter(next(iter(d))[0] for d in valid_docs)["A"] / len(valid) - 0.75) < 0.03
    seen_train, seen_valid = set().union(*train_docs), set().union(*valid_docs)
    assert seen_train and seen_valid and not seen_train & seen_valid
    # the valid documents are those of the seeded document shuffle, spread over the corpus (not its tail)
    chosen = set(split_documents(120, [0.9, 0.1, 0.0], DEFAULT_SPLIT_SEED)["valid"].tolist())
    assert len(chosen) == 12 and {int(n) for _, n in seen_valid} <= chosen and min(chosen) < 60


def test_samples_have_the_synthetic_tokens_interface(corpora, tmp_path):
    train, _ = build(corpora, tmp_path / "cache", blend=((0, 1.0),), train=50)
    assert len(train) >= 50
    eos_seen = False
    for i in range(len(train)):
        sample = train[i]
        assert set(sample) == {"tokens", "labels", "loss_mask"}
        assert sample["tokens"].dtype == sample["labels"].dtype == torch.long and sample["loss_mask"].dtype == torch.float32
        assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (SEQ,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels are tokens shifted by one
        assert torch.all(sample["loss_mask"] == 1)  # loss on every token, eos included (OPT)
        eos_seen |= bool((sample["labels"] == 2).any())
    assert eos_seen
    with pytest.raises(IndexError):
        train[len(train)]


def test_second_build_reuses_the_cache(corpora, tmp_path):
    cache = tmp_path / "cache"
    first, _ = build(corpora, cache)
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert any("BlendedDataset" in n for n in files) and any("GPTDataset" in n for n in files)
    again, _ = build(corpora, cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # nothing rebuilt or rewritten
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(0, len(first), 7))
    other_seed = build_datasets([(corpora[0], 3.0), (corpora[1], 1.0)], "90,10,0", SEQ, 99, 800, 100, cache, 50272)[0]
    assert not all(torch.equal(first[i]["tokens"], other_seed[i]["tokens"]) for i in range(20))
    assert len(list(cache.iterdir())) > len(files)


def test_corpus_stats_and_no_valid_when_not_asked(corpora, tmp_path):
    stats = corpus_stats(corpora[0])
    assert stats.documents == 120 and stats.tokens == json.loads(corpora[0].with_name("A.summary.json").read_text())["tokens"]
    train, valid = build(corpora, tmp_path / "cache", split="100,0,0", valid=10)
    assert valid is None and len(train) >= 800
    assert build(corpora, tmp_path / "cache", valid=0)[1] is None
    train, valid = build_datasets([(corpora[0], 1.0)], "90,10,0", SEQ, 5, 10, 5)  # default cache, vocabulary
    assert train.megatron_dataset.config.tokenizer.vocab_size == 50265
    assert any(corpora[0].with_name("index-cache").iterdir())


def test_bad_arguments_are_refused_before_building(corpora, tmp_path):
    with pytest.raises(DataError, match="no dataset at .*missing.*opt-ds preprocess"):
        build_datasets([(tmp_path / "missing", 1.0)], "90,10,0", SEQ, 1, 10, 1, tmp_path / "c", 50272)
    with pytest.raises(DataError, match="not 'train,valid,test' weights"):
        build(corpora, tmp_path / "c", split="90;10")
    with pytest.raises(DataError, match="positive number"):
        build(corpora, tmp_path / "c", blend=((0, 0.0),))
    with pytest.raises(DataError, match="has 120 documents: the split gives its valid part none"):
        build(corpora, tmp_path / "c", split="999,1,0")
    with pytest.raises(DataError, match="vocabulary of 50265 entries, more than vocab_size=1000"):
        build_datasets([(corpora[0], 1.0)], "90,10,0", SEQ, 1, 10, 1, tmp_path / "c", 1000)
    trained = tmp_path / "trained"
    preprocess(PreprocessConfig(inputs=[str(corpora[0].with_name("A.jsonl"))], output_prefix=str(trained),
                                vocab_size=300), progress=False)
    with pytest.raises(DataError, match="mixes tokenizers"):
        build_datasets([(corpora[0], 1.0), (trained, 1.0)], "90,10,0", SEQ, 1, 10, 1, tmp_path / "c", 50272)
    bare = tmp_path / "bare"  # .bin/.idx made elsewhere: no tokenizer beside them
    for suffix in (".bin", ".idx"):
        shutil.copyfile(corpora[0].with_name("A" + suffix), bare.with_name("bare" + suffix))
    with pytest.raises(DataError, match="no tokenizer saved beside .*pass vocab_size"):
        build_datasets([(bare, 1.0)], "90,10,0", SEQ, 1, 10, 1, tmp_path / "c")
    assert not (tmp_path / "c").exists()


RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    torch.distributed.init_process_group("gloo")
    from opt_ds.data.datasets import build_datasets
    a, b, cache, out = sys.argv[1:]
    train, valid = build_datasets([(a, 3.0), (b, 1.0)], "90,10,0", 32, 1234, 800, 100, cache, 50272)
    digest = lambda ds: hashlib.sha256(b"".join(ds[i]["tokens"].numpy().tobytes() for i in range(len(ds)))).hexdigest()
    rank = torch.distributed.get_rank()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"train": digest(train), "valid": digest(valid), "len": [len(train), len(valid)]}, f)
    torch.distributed.destroy_process_group()
""")


def digest(dataset) -> str:
    return hashlib.sha256(b"".join(dataset[i]["tokens"].numpy().tobytes() for i in range(len(dataset)))).hexdigest()


def test_two_gloo_ranks_get_the_single_process_samples(corpora, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    torchrun(2, script, corpora[0], corpora[1], tmp_path / "cache", tmp_path / "result", timeout=180)
    results = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    train, valid = build(corpora, tmp_path / "single-process-cache")
    expected = {"train": digest(train), "valid": digest(valid), "len": [len(train), len(valid)]}
    assert results == [expected, expected]
    # rank 0 built each index once and rank 1 loaded it: one set of cache files, named as in one process
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single-process-cache").iterdir())


def test_validation_samples_do_not_depend_on_training_length_or_seed(corpora, tmp_path):
    """The validation samples are the same whatever train.steps (train samples), the train seed or the number
    of validation samples asked; another split_seed picks other validation documents."""
    blend = [(corpora[0], 3.0), (corpora[1], 1.0)]
    _, valid = build_datasets(blend, "90,10,0", SEQ, 1234, 800, 100, tmp_path / "cache", 50272)
    _, fewer = build_datasets(blend, "90,10,0", SEQ, 7, 300, 40, tmp_path / "cache", 50272)
    assert len(valid) == len(fewer) >= 20
    assert all(torch.equal(valid[i]["tokens"], fewer[i]["tokens"]) for i in range(len(valid)))
    _, other = build_datasets(blend, "90,10,0", SEQ, 1234, 800, 100, tmp_path / "cache", 50272, split_seed=5)
    assert not all(torch.equal(valid[i]["tokens"], other[i]["tokens"]) for i in range(20))
    recorded = describe_split(blend, "90,10,0")
    assert [(r["train_documents"], r["valid_documents"], r["test_documents"]) for r in recorded] == [(108, 12, 0)] * 2
    assert recorded[0]["valid_documents_sha256"] != describe_split(blend, "90,10,0", 5)[0]["valid_documents_sha256"]

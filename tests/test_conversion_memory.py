"""Streaming conversion: peak memory does not grow with the number of layers, and each source file is read once.

The models are random OPTs of one small width (layers of ~7 MiB in fp32) with 3 and 24 decoder layers: if
any reader, writer or the verification held the whole model, the 24-layer run would need ~150 MiB more than
the 3-layer one (verification streams 10 passes: 8 over the source, 1 over the target, 1 through
transformers, so more layers cost time, not proof). Each conversion runs in a fresh process
(conversion.bench_memory.measure: peak RSS beyond the imports, glibc returning freed blocks at once), with
verification on, from an opt_ds checkpoint at TP=2.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from conversion.bench_memory import measure, write_source
from conversion.convert import Options, convert
from conversion.canonical import layer_shapes
from opt_ds.models.presets import OPTShape

FEW, MANY = 3, 24
TARGETS = {"hf": {"to": "hf"}, "metaseq": {"to": "metaseq", "tp": 2}, "opt_ds": {"to": "opt_ds", "tp": 2, "pp": 2}}


def shape(layers: int) -> OPTShape:
    return OPTShape(layers, 384, 4, 1536, vocab_size=512, max_position_embeddings=64)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {layers: write_source(shape(layers), root / f"{layers}-layers") for layers in (FEW, MANY)}


@pytest.mark.parametrize("target", TARGETS)
def test_peak_memory_does_not_grow_with_layers(sources, tmp_path, target):
    peaks = {}
    for layers, src in sources.items():
        result = measure(src, tmp_path / f"{layers}", TARGETS[target], timeout=600)
        assert result["exit"] == 0, result
        peaks[layers] = result["peak_bytes"]
    layer_bytes = sum(torch.Size(s).numel() for s in layer_shapes(shape(1)).values()) * 4 * (MANY - FEW)
    assert peaks[MANY] < 1.5 * peaks[FEW], \
        f"{target}: {peaks[MANY] / 2 ** 20:.0f} MiB for {MANY} layers vs {peaks[FEW] / 2 ** 20:.0f} MiB for {FEW} " \
        f"(the {MANY - FEW} extra layers hold {layer_bytes / 2 ** 20:.0f} MiB)"


def test_each_source_layer_file_is_read_once_for_a_tp4_metaseq_export(sources, tmp_path, monkeypatch):
    """Every layer file of the opt_ds source has its tensors loaded once while four metaseq parts are
    written (the opening check reads only the files' pickles: map_location='meta')."""
    loads = Counter()
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        if kwargs.get("map_location") != "meta":
            loads[Path(f).name] += 1
        return real_load(f, *args, **kwargs)
    monkeypatch.setattr(torch, "load", counting_load)
    src = sources[FEW]
    assert convert(src, tmp_path / "ms", Options(to="metaseq", tp=4, verify=False), out=lambda _: None) == 0
    layer_files = sorted(p.name for p in (src / "global_step0").glob("layer_*-model_states.pt"))
    assert len(layer_files) == 2 * (FEW + 3)
    assert {name: loads[name] for name in layer_files} == {name: 1 for name in layer_files}
    monkeypatch.undo()
    parts = [torch.load(tmp_path / "ms" / f"reshard-model_part-{k}.pt", weights_only=False) for k in range(4)]
    assert all(p["cfg"]["model"].model_parallel_size == 4 for p in parts)
    assert parts[0]["model"][f"decoder.layers.{FEW - 1}.fc1.weight"].shape == (1536 // 4, 384)

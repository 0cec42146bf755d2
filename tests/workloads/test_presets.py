"""The BERT-Large and GPT-2 XL workload models: generated on the meta device in seconds and
little memory, equal to the committed presets, and equal to the architectures' closed forms."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from kfacperf.sim.models import load_workload, load_workload_model

GIB = 2**30


def _encoder_layer_params(h: int) -> int:
    """q, k, v, out (h x h + bias), ffn h -> 4h -> h (+ biases), two LayerNorms."""
    return 4 * (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * 2 * h


@pytest.mark.slow
def test_gpt2_and_bert_are_generated_in_seconds_within_1_gib(tmp_path):
    # The generator runs in a grandchild: a child forked from this (large) test process
    # starts with its resident pages, and Linux keeps ru_maxrss across exec.  The middle
    # process is small when it forks, so RUSAGE_CHILDREN there is the generator's own peak.
    generate = (
        "import json, sys, time\n"
        "from kfacperf.cli import main\n"
        "t = time.perf_counter()\n"
        "assert main(['calibrate', '--workload', 'gpt2-xl', "
        f"'--out', {str(tmp_path / 'g.toml')!r}]) == 0\n"
        "t_gpt2 = time.perf_counter() - t\n"
        "assert main(['calibrate', '--workload', 'bert-large', "
        f"'--out', {str(tmp_path / 'b.toml')!r}]) == 0\n"
        "print(json.dumps({'gpt2_s': t_gpt2, 'both_s': time.perf_counter() - t}))\n"
    )
    measure = (
        "import json, resource, subprocess, sys\n"
        f"proc = subprocess.run([sys.executable, '-c', {generate!r}], "
        "capture_output=True, text=True)\n"
        "sys.stderr.write(proc.stderr)\n"
        "assert proc.returncode == 0, proc.stdout\n"
        "out = json.loads(proc.stdout.strip().splitlines()[-1])\n"
        "out['maxrss_kib'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS {measured['maxrss_kib'] / 2**20:.2f} GiB (import torch included); "
          f"GPT-2 XL in {measured['gpt2_s']:.1f} s, with BERT-Large {measured['both_s']:.1f} s")
    assert measured["maxrss_kib"] * 1024 <= GIB  # 1.56 B fp32 parameters alone are 5.8 GiB
    for fresh, preset in (("g.toml", "gpt2-xl"), ("b.toml", "bert-large")):
        new, committed = load_workload_model(tmp_path / fresh), load_workload(preset)
        assert new.layers == committed.layers, preset
        assert (new.other_params, new.options, new.input_shape) == (
            committed.other_params, committed.options, committed.input_shape)
        assert new.other_fwd_flops_per_example == pytest.approx(
            committed.other_fwd_flops_per_example)


def test_gpt2_xl_is_the_papers_1_5_billion_parameter_decoder():
    w = load_workload("gpt2-xl")
    h, layers, vocab, ctx = 1600, 48, 50257, 1024
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 4 * h
    assert w.total_params == layers * per_layer + (vocab + ctx) * h + 2 * h == 1_557_611_200
    assert len(w.layers) == 4 * layers and w.input_shape == (ctx,) and w.input_dtype == "int64"
    qkv = w.layer("blocks.0.attn.qkv")
    assert (qkv.dim_a, qkv.dim_g, qkv.rows_per_example) == (h + 1, 3 * h, ctx)
    assert sum(l.fwd_flops_per_example for l in w.layers) == 2 * layers * 12 * h * h * ctx
    # outside K-FAC layers: QK^T and AV per layer (2 * T^2 * h each), the tied LM head
    assert w.other_fwd_flops_per_example == layers * 2 * 2 * ctx * ctx * h + 2 * ctx * h * vocab


@pytest.mark.parametrize(("preset", "seq"), [("bert-large", 128), ("bert-large-seq512", 512)])
def test_bert_large_is_the_papers_model(preset, seq):
    w = load_workload(preset)
    h, layers, vocab = 1024, 24, 30522
    masked = math.ceil(0.15 * seq)
    assert w.options["seq_len"] == seq and w.input_shape == (seq,)
    heads = (h * h + h) + 2 * h + vocab + (h * h + h) + (2 * h + 2)  # MLM, pooler, NSP
    embeddings = (vocab + 512 + 2) * h + 2 * h
    assert w.total_params == layers * _encoder_layer_params(h) + embeddings + heads
    assert len(w.layers) == 6 * layers + 3
    assert [l.name for l in w.layers[-3:]] == ["mlm_transform", "pooler", "nsp"]
    assert w.layer("layers.0.ff1").rows_per_example == seq
    assert w.layer("mlm_transform").rows_per_example == masked
    assert w.other_fwd_flops_per_example == layers * 2 * 2 * seq * seq * h + 2 * masked * h * vocab


def test_the_block_preset_is_one_bert_large_layer():
    w, full = load_workload("bert-large-block"), load_workload("bert-large")
    block = [l for l in full.layers if l.name.startswith("layers.0.")]
    assert [l.name for l in w.layers] == [l.name.removeprefix("layers.0.") for l in block]
    for a, b in zip(w.layers, block):
        assert (a.dim_a, a.dim_g, a.params, a.fwd_flops_per_example) == (
            b.dim_a, b.dim_g, b.params, b.fwd_flops_per_example)
    assert w.total_params == _encoder_layer_params(1024)

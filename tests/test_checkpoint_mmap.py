"""Loading a checkpoint holds its weights once (issue 15 part 4): safetensors are memory-mapped and the
mapped tensors become the parameters, so peak RSS during `load_model` stays <= 1.2x the weights' size
(before: a copy read by safe_open plus the model's own storage, ~2x). Hostile headers are clear errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from qiusuo.model import build_model, load_model, save_model
from qiusuo.model.checkpoint import mmap_safetensors


def test_peak_rss_while_loading_is_at_most_1_2x_the_weights(tmp_path):
    model, tok = build_model("tiny-dense", seed=0, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                             num_attention_heads=8)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes > 80 << 20  # large enough that the interpreter's own noise is small beside it
    save_model(model, tok, tmp_path / "m")
    del model
    script = textwrap.dedent(f"""
        import torch
        import qiusuo.tokenizer
        from qiusuo.model import load_model, preset, Transformer
        with torch.device("meta"):  # torch's one-time lazy initialisation (~80 MB, any size) before the baseline
            Transformer(preset("tiny-dense"))
        def status(key):  # bytes
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS")
        model, _ = load_model({str(tmp_path / "m")!r})
        for p in model.parameters():
            p.sum()  # every page of the weights resident, as after a forward
        print(base, status("VmHWM"))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    base, peak = map(int, out.stdout.split())
    assert peak - base <= 1.2 * weight_bytes, f"loading took {(peak - base) / weight_bytes:.2f}x the weights' size "


def test_mmap_loaded_weights_equal_the_saved_ones_and_writes_stay_private(tmp_path):
    model, tok = build_model("tiny-moe", seed=0)
    save_model(model, tok, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with torch.no_grad():
        loaded.model.norm.weight.add_(1.0)  # a trainer's in-place update
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    bf16, _ = load_model(tmp_path / "m", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.moe_layers()[0].gate.weight.dtype == torch.float32


def _write(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, bytes(16), "do not fit"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(16), "do not fit"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(16), "do not fit"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(16), "not supported"),
])
def test_hostile_headers_are_clear_errors(tmp_path, header, data, match):
    _write(tmp_path / "x.safetensors", header, data)
    with pytest.raises(ValueError, match=match):
        mmap_safetensors(tmp_path / "x.safetensors")


def test_header_length_beyond_the_file_is_an_error(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="exceeds"):
        mmap_safetensors(tmp_path / "x.safetensors")

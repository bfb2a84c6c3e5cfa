"""The export part: GGUF files for llama.cpp / Ollama, of models and of LoRA adapters on them (quantization for
our engine: qiusuo.model.quantize, re-exported here).

`gguf` is an optional dependency (the `gguf` extra); it is imported only when exporting.
"""

from __future__ import annotations

from typing import Any


def export_gguf(model: Any, tokenizer: Any, path: Any, dtype: str = "f16", name: str = "qiusuo", mtp: bool = True):
    """See `qiusuo.export.gguf_file.export_gguf`."""
    try:
        from .gguf_file import export_gguf as _export
    except ImportError as e:  # only the missing package itself gets the install hint
        if e.name != "gguf":
            raise
        raise ValueError("GGUF export needs the `gguf` package: pip install 'qiusuo[gguf]'") from None
    return _export(model, tokenizer, path, dtype=dtype, name=name, mtp=mtp)


def export_lora_gguf(model: Any, adapter_dir: Any, path: Any, dtype: str = "f32", name: str = "qiusuo-lora"):
    """See `qiusuo.export.gguf_lora.export_lora_gguf`: a LoRA adapter as a llama.cpp adapter GGUF."""
    try:
        from .gguf_lora import export_lora_gguf as _export
    except ImportError as e:
        if e.name != "gguf":
            raise
        raise ValueError("GGUF export needs the `gguf` package: pip install 'qiusuo[gguf]'") from None
    return _export(model, adapter_dir, path, dtype=dtype, name=name)


def check_gguf_support(config: Any) -> str:
    """The llama.cpp architecture for `config`, or ValueError naming the field llama.cpp cannot represent."""
    from .gguf_file import check_gguf_support as _check

    return _check(config)


from .quantize import QuantizedLinear, quantize_model  # noqa: E402  (torch only, no gguf)

__all__ = ["export_gguf", "export_lora_gguf", "check_gguf_support", "quantize_model", "QuantizedLinear"]

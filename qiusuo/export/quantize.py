"""Moved: quantization is a model transform the engine applies, now `qiusuo.model.quantize`.

Kept so that `from qiusuo.export.quantize import quantize_model` keeps working for export code
and older scripts.
"""

from qiusuo.model.quantize import (  # noqa: F401
    QuantizedExperts,
    QuantizedLinear,
    quantize_model,
    quantize_per_channel,
)

__all__ = ["quantize_model", "QuantizedLinear", "QuantizedExperts", "quantize_per_channel"]

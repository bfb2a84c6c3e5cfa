"""qiusuo (求索, "to seek"): the DeepSeek-R1 recipe on modest hardware.

Public entry points are imported lazily so that `import qiusuo` stays cheap and
has no side effects.
"""

__version__ = "0.1.0"

_LAZY = {
    "Transformer": "qiusuo.model",
    "ModelConfig": "qiusuo.model",
    "load_model": "qiusuo.model",
    "save_model": "qiusuo.model",
    "Tokenizer": "qiusuo.tokenizer",
    "LLM": "qiusuo.engine",
    "SamplingParams": "qiusuo.engine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qiusuo' has no attribute {name!r}")

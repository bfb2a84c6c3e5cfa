"""The generation engine: continuous batching over a paged KV cache with prefix sharing.

The one generation path of qiusuo (rollouts, eval, CLI chat, serving). The split follows
nano-vllm with vLLM's names: `SamplingParams`, `Sequence`/`SequenceGroup`, `BlockManager`,
`Scheduler`, `ModelRunner` (over `PagedKVCache`), `LLMEngine`, and the offline `LLM`.
"""

from .config import EngineConfig
from .guided import StructuredOutputsParams
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]

"""`LoRARequest`: which LoRA adapter a request runs with (vLLM's name and fields).

The engine serves several adapters on one base model (`EngineConfig.lora_modules`, or `LLM.generate(...,
lora_request=LoRARequest(name, id, path))`, which loads the adapter on first use). Each sequence carries
its adapter's id (0: the base); every forward applies each row's adapter to that row only
(qiusuo/model/lora.py, `MultiLoRALinear`), so base requests and requests of different adapters share
one batch. A prompt's cached KV blocks are shared only between requests of the same adapter
(block_manager.py keys the first block by it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # the name requests use (the server's `model`)
    lora_int_id: int = 0  # vLLM's unique id; here the engine numbers adapters itself and ignores it
    lora_path: str | None = None  # the adapter directory (PEFT layout), loaded when the name is new

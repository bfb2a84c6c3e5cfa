"""The learner group: M Ray actors that train one policy with torch.distributed data parallelism.

Each rank runs the single process's `PolicyUpdate` as rank r of M: every minibatch (whole
groups, as in the single process) is cut into M contiguous row slices, rank r trains on slice r,
and its loss is divided by the whole minibatch's normaliser / M (`PolicyUpdate.normalizer`).
Before every optimizer step the gradients are summed across ranks and divided by M, so each rank
applies the gradient the single process would have computed on the whole minibatch, and the
replicas stay equal.

Why an explicit all-reduce instead of wrapping the model in `DistributedDataParallel`: the loss
is computed through `model.hidden_states` (not `forward`, which DDP hooks), a rank may hold no
rows of a small minibatch (DDP would wait for its backward), and MoE experts unused by a batch
would need `find_unused_parameters`. The arithmetic is DDP's (average of the ranks' gradients,
one flat bucket); what is lost is the overlap of communication with backward, which tiny models
do not need. The MoE router-bias update sums expert loads across ranks (`update_router_bias`'s
`reduce`), so routers stay in step too. Backend: gloo on CPU, nccl on CUDA. M = 1 uses no
process group at all.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile

import torch

from ..loop import NonFiniteLossError, Trainer, setup_torch
from ..policy import PolicyUpdate
from ..state import load_optimizer, optimizer_tensors
from .cluster import actor_resources


class DataParallelTrainer(Trainer):
    """`Trainer` whose optimizer step first averages the gradients of the `world` ranks."""

    def __init__(self, cfg, model, tokenizer, world: int):
        super().__init__(cfg, model, tokenizer, "grpo")
        self.world = world

    def optimizer_step(self) -> dict[str, float]:
        # Trainer.optimizer_step plus the two all-reduces (gradients, MoE expert loads).
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world > 1:
            _average_gradients(params, self.world)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {norm}; the run stopped. Lower --lr, keep --grad-clip on, "
                                     "or use --dtype float32, and --resume from the last checkpoint")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_updates += 1
        out = {"grad_norm": norm}
        out.update(self.model.update_router_bias(reduce=_all_reduce_sum if self.world > 1 else None))
        return out


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,): one all-reduce per step
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t


class Learner:
    """Rank `rank` of `world`: a policy replica, its optimizer, and GRPO's update on its slice."""

    def __init__(self, cfg, model_config, tokenizer, init_weights: dict[str, torch.Tensor], rank: int, world: int):
        from qiusuo.model import Transformer

        setup_torch(cfg)
        self.cfg, self.rank, self.world = cfg, rank, world
        model = Transformer(model_config).to(cfg.device)
        model.load_state_dict(init_weights)
        self.model = model.train().requires_grad_(True)
        self.trainer = DataParallelTrainer(cfg, model, tokenizer, world)
        # Built from the initial weights, before any resumed state arrives: its reference is the initial
        # policy, as in the single process.
        self.update = PolicyUpdate(cfg, self.trainer, rank, world)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous(self, single_node: bool) -> str:
        """init_method of torch.distributed's store (called on rank 0). torch's TCPStore listens
        on every interface, whatever host it is given, and has no authentication: on one node
        a FileStore in a fresh 0700 directory is used instead, so nothing listens at all. Across
        nodes the TCP store is unavoidable; README's Ray section gives the firewall rule."""
        if single_node:
            return f"file://{tempfile.mkdtemp(prefix='qiusuo-store-')}/store"
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, init_method: str) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.cfg.device.startswith("cuda") else "gloo"
        if init_method.startswith("file://"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets on loopback too
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world)

    def train_on(self, batch, lr: float) -> dict[str, float]:
        """One GRPO update on `batch` (the whole step's Rollouts; this rank trains on its slices)."""
        for g in self.trainer.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        result = self.update(batch.to(self.trainer.device))
        if "loss" not in result:  # this rank held no rows: its 0 entropy is not a measurement
            result.pop("entropy")
        return result

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
        """(weights, optimizer tensors, optimizer param groups): what a checkpoint holds."""
        tensors, groups = optimizer_tensors(self.trainer.optimizer)
        return self.weights(), tensors, groups

    def load_state(self, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                   groups: list[dict]) -> None:
        self.model.load_state_dict(weights)
        if tensors:  # a fresh run has no optimizer state yet
            load_optimizer(self.trainer.optimizer, {k: v.to(self.trainer.device) for k, v in tensors.items()},
                           groups)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """The driver's side: start M learner actors, join their process group, fan out updates."""

    def __init__(self, ray, cfg, model_config, tokenizer, init_weights_ref):
        self.ray = ray
        M = cfg.learner_workers
        resources = actor_resources(ray, cfg.device, cfg.rollout_workers + M)
        if M > 1 and 0 < resources["num_gpus"] < 1:
            raise ValueError(f"--learner-workers {M} on CUDA needs a GPU per learner (nccl cannot put two ranks on "
                             "one GPU) and the cluster has fewer GPUs than actors; use --learner-workers 1")
        # No restarts: a learner holds optimizer state only it has; its loss ends the run (--resume).
        remote = ray.remote(Learner).options(**resources, max_restarts=0)
        self.actors = [remote.remote(cfg, model_config, tokenizer, init_weights_ref, r, M) for r in range(M)]
        if M > 1:
            single_node = len(set(ray.get([a.node.remote() for a in self.actors]))) == 1
            init_method = ray.get(self.actors[0].rendezvous.remote(single_node))
            ray.get([a.join.remote(init_method) for a in self.actors])

    def load_state(self, weights, tensors, groups) -> None:
        refs = [self.ray.put(x) for x in (weights, tensors, groups)]
        self.ray.get([a.load_state.remote(*refs) for a in self.actors])

    def update(self, batch, lr: float) -> dict[str, float]:
        """Train every rank on `batch`; metrics averaged over the ranks that held rows (loss: over all ranks,
        which is the whole batch's loss since each rank's is its share times M)."""
        ref = self.ray.put(batch)
        results = self.ray.get([a.train_on.remote(ref, lr) for a in self.actors])
        out = {"loss": sum(r.get("loss", 0.0) for r in results) / len(results)}
        for k in {k for r in results for k in r} - {"loss"}:
            vals = [r[k] for r in results if k in r]
            out[k] = sum(vals) / len(vals)
        return out

    def weights_ref(self):
        return self.actors[0].weights.remote()

    def state(self):
        return self.ray.get(self.actors[0].state.remote())

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


__all__ = ["Learner", "LearnerGroup", "DataParallelTrainer"]

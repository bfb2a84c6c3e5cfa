"""Training configs: one dataclass for the loop, one per stage that extends it.

Every stage config *is* a `TrainConfig` (dataclass inheritance), so the loop reads the same
fields whatever the stage; SFT and distillation share `FinetuneConfig` (batch, learning rate,
record length), and each declares only the fields it reads. The CLI builds its flags from these
classes (cli/flags.py): there is no second list of defaults. Each class validates itself in
`__post_init__` (the enumerated fields, typed `Literal[...]`, in `check_choices`) and raises a
`ValueError` that names the rule and the fix, so a bad run fails before its first step.

Defaults of `PretrainConfig` and `GRPOConfig` are the recipe that worked in the CPU prototype
(a 0.81M-parameter model, greedy accuracy on 3-digit addition 14% -> 98% after GRPO): pretrain
lr 3e-3, 50-step warmup, cosine to 10%, batch 128; GRPO lr 1e-4 (5e-4 collapsed), 16 prompts x
G=8 at T=1, beta=0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qiusuo.fields import check_choices, option
from qiusuo.runtime import default_threads

# The enumerated fields (checked by check_choices; the CLI shows the values)
Schedule = Literal["cosine", "constant"]
AutocastDType = Literal["auto", "float32", "bfloat16"]
Blurt = Literal["guess", "direct"]
ScaleRewards = Literal["group", "none"]
LossAgg = Literal["token", "sequence", "constant"]
ImportanceSamplingLevel = Literal["token", "sequence"]


@dataclass
class TrainConfig:
    """The loop: optimizer, schedule, precision, checkpoints, logging."""

    out: str = option("runs/train", "run directory (config.json, metrics.jsonl, checkpoints/, final/)")
    seed: int = option(0, "seed of every random stream (init, data, sampling)")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")
    threads: int = option(0, "torch CPU threads (0: measured: the first steps are timed at 1 and 2 threads, the "
                          "faster kept and re-checked every 2 minutes or more)")
    steps: int = option(100, "optimizer steps (budgets are in steps, so a loaded machine gives the same model later)")
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    warmup_steps: int = option(0, "linear warmup steps")
    schedule: Schedule = option("cosine", "learning-rate schedule after warmup: cosine or constant")
    min_lr_ratio: float = option(0.1, "cosine decays to lr * min_lr_ratio")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    grad_accum: int = option(1, "micro-batches per optimizer step (the batch is split into this many)")
    dtype: AutocastDType = option("auto", "autocast dtype: auto (bf16 on CUDA that supports it, fp32 on CPU), "
                        "float32, bfloat16")
    save_every: int = option(0, "write a resumable checkpoint every N steps (0: only at the end and on Ctrl-C)")
    keep_checkpoints: int = option(2, "how many step checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in --out (exactly: optimizer, schedule, "
                          "data, RNG)")
    progress: bool = option(True, "show a progress bar")
    register: str = option("", "import the final model into the model registry under this NAME[:TAG]")
    lora_rank: int = option(0, "LoRA rank r (0: off, full fine-tuning): the base stays frozen and only the "
                            "adapters train (PEFT's r; TRL's --lora_r); final/ gets the merged model and "
                            "final/adapter/ the PEFT adapter")
    lora_alpha: float = option(32.0, "LoRA alpha: the update is scaled by alpha / r (PEFT's lora_alpha)")
    lora_targets: str = option("all-linear", "linear layers that get adapters: all-linear (attention and the "
                               "dense MLP / shared experts, not routed experts, router or head) or module "
                               "names, comma-separated (q_proj,v_proj)")
    gradient_checkpointing: bool = option(False, "recompute each decoder layer's activations in the backward "
                                          "pass instead of storing them (less memory, ~1 more forward)")

    def __post_init__(self):
        check_choices(self)  # every Literal field of this class and its stage's (schedule, dtype, loss_agg, ...)
        if self.register:
            from qiusuo.registry import parse_name

            parse_name(self.register)  # a bad name fails now, not after the run
        # 0: measured. The loop starts at default_threads() and times its first steps at each
        # count (qiusuo.runtime.ThreadTuner); auto_threads is not a field, so not in to_dict().
        self.auto_threads = self.threads == 0
        if self.threads == 0:
            self.threads = default_threads()
        positive = ("steps", "grad_accum", "keep_checkpoints", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--warmup-steps, --save-every, --grad-clip and --weight-decay must be >= 0")
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(
                f"--warmup-steps {self.warmup_steps} >= --steps {self.steps}: the run would end before the "
                "peak learning rate; lower --warmup-steps or raise --steps"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0: off), got {self.lora_rank}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if self.lora_rank and not self.lora_targets.strip():
            raise ValueError("--lora-targets is empty; give all-linear or module names such as q_proj,v_proj")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PretrainConfig(TrainConfig):
    """Next-token training of a fresh model on a task's corpus of worked solutions."""

    out: str = option("runs/pretrain", TrainConfig.__dataclass_fields__["out"].metadata["help"])
    preset: str = option("tiny-dense", "model preset (tiny-dense, tiny-moe) or a config.json path")
    task: str = option("arithmetic", "task whose synthetic corpus to train on")
    template: str = option("compact", "prompt template of the task")
    batch_size: int = option(128, "sequences per optimizer step")
    difficulty: str = option("", "difficulty levels of the corpus, comma-separated, drawn uniformly per problem "
                             "(e.g. 1,2,3: a mix of lengths); empty: the task's default level")
    steps: int = option(650, "optimizer steps (650 x 128: the prototype's base that is right ~15-25% of the time)")
    lr: float = option(3e-3, "peak learning rate")
    warmup_steps: int = option(50, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    adam_beta2: float = option(0.95, "AdamW beta2")
    p_direct: float = option(0.6, "share of blurted traces (<think></think> then an answer, no steps)")
    p_slip: float = option(0.3, "share of scratchpad traces with one propagated arithmetic slip")
    blurt_rows: float | None = option(
        None, "share of a batch's rows drawn as blurts, their loss importance-weighted so that the objective "
        "keeps --p-direct's mix (a blurt teaches only how often to blurt, so fewer, heavier blurt rows make a "
        "cheaper step for the same expected loss); default: --p-direct, unweighted")
    blurt: Blurt = option("guess", "what a blurted trace answers: guess (another random problem's answer, right "
                        "only by chance, so no base learns to blurt right) or direct (the right answer)")

    def __post_init__(self):
        super().__post_init__()
        _check_batch(self)
        for name in ("p_direct", "p_slip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.blurt_rows is not None and not (0 < self.blurt_rows < 1 and 0 < self.p_direct < 1):
            raise ValueError(f"--blurt-rows must be in (0, 1) and needs --p-direct in (0, 1), got {self.blurt_rows} "
                             f"with --p-direct {self.p_direct}")
        self.difficulty_levels()  # a malformed list fails now, not at step 1

    def blurt_weight(self) -> float:
        """The loss weight of a blurt row when --blurt-rows q draws blurts instead of --p-direct p: the
        likelihood ratio (p / (1 - p)) / (q / (1 - q)) against a scratchpad row's 1, so the weighted share of
        blurts is p, as in the unweighted corpus (the same objective in expectation)."""
        p, q = self.p_direct, self.blurt_rows
        return 1.0 if q is None else (p / (1 - p)) / (q / (1 - q))

    def difficulty_levels(self) -> list[int] | None:
        """--difficulty as the task's `difficulty` argument: None (its default) or a list of levels."""
        if not self.difficulty.strip():
            return None
        try:
            return [int(x) for x in self.difficulty.split(",")]
        except ValueError:
            raise ValueError(f"--difficulty {self.difficulty!r}: give comma-separated integers, e.g. 1,2,3") from None


@dataclass
class FinetuneConfig(TrainConfig):
    """What SFT and distillation share: next-token training on completion rows of an existing checkpoint."""

    batch_size: int = option(32, "sequences per optimizer step")
    lr: float = option(1e-4, "peak learning rate")
    max_length: int = option(512, "drop records longer than this many tokens")

    def __post_init__(self):
        super().__post_init__()
        _check_batch(self)


@dataclass
class SFTConfig(FinetuneConfig):
    """Supervised fine-tuning on prompt/completion or chat records; loss on completion tokens only."""

    out: str = option("runs/sft", TrainConfig.__dataclass_fields__["out"].metadata["help"])
    model: str = option("", "checkpoint directory to fine-tune", required=True)
    data: str = option("", "JSONL file: {prompt, completion} or {messages: [...]} per line", required=True)

    def __post_init__(self):
        super().__post_init__()
        self.model = _check_model_dir(self.model, "--model")
        if not Path(self.data).is_file():
            raise ValueError(f"--data {self.data!r} does not exist; give a JSONL file of prompt/completion records")


@dataclass
class DistillConfig(FinetuneConfig):
    """Rejection-sample a teacher on a task, keep the correct completions, fine-tune the student."""

    out: str = option("runs/distill", TrainConfig.__dataclass_fields__["out"].metadata["help"])
    teacher: str = option("", "teacher checkpoint directory (samples through the engine)", required=True)
    student: str = option("", "student checkpoint directory (fine-tuned)", required=True)
    task: str = option("arithmetic", "task to sample and score")
    template: str = option("compact", "prompt template of the task")
    num_prompts: int = option(512, "problems the teacher attempts")
    samples_per_prompt: int = option(4, "teacher samples per problem")
    temperature: float = option(1.0, "teacher sampling temperature")
    max_tokens: int = option(64, "most new tokens per teacher sample")
    keep_per_prompt: int = option(1, "correct samples kept per problem (distinct texts)")

    def __post_init__(self):
        super().__post_init__()
        self.teacher = _check_model_dir(self.teacher, "--teacher")
        self.student = _check_model_dir(self.student, "--student")
        for name in ("num_prompts", "samples_per_prompt", "max_tokens", "keep_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.keep_per_prompt > self.samples_per_prompt:
            raise ValueError("--keep-per-prompt cannot exceed --samples-per-prompt; lower it")


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO with answer-only rewards (see grpo.py for the exact variant)."""

    out: str = option("runs/grpo", TrainConfig.__dataclass_fields__["out"].metadata["help"])
    model: str = option("", "checkpoint directory of the policy to train", required=True)
    task: str = option("arithmetic", "task whose problems and rule-based reward to use")
    template: str = option("compact", "prompt template of the task")
    prompts_per_step: int = option(16, "problems per step (each sampled G times)")
    group_size: int = option(8, "G: completions per problem")
    temperature: float = option(1.0, "rollout sampling temperature")
    max_tokens: int = option(48, "most new tokens per completion")
    steps: int = option(100, "GRPO steps (one batch of rollouts each)")
    lr: float = option(1e-4, "learning rate (the prototype collapsed at 5e-4)")
    schedule: Schedule = option("constant", "learning-rate schedule after warmup: cosine or constant")
    epsilon_low: float = option(0.2, "ratio clip below: 1 - epsilon_low")
    epsilon_high: float = option(0.28, "ratio clip above: 1 + epsilon_high (DAPO clip-higher)")
    beta: float = option(0.0, "KL(k3) coefficient to the initial policy (0: no reference model is kept)")
    scale_rewards: ScaleRewards = option("group", "advantage scaling: group ((r-mean)/std) or none (Dr.GRPO: r-mean)")
    loss_agg: LossAgg = option("token", "token (DAPO: sum / all tokens), sequence (GRPO: mean per sequence) or "
                           "constant (Dr.GRPO: sum / (sequences * max_tokens))")
    importance_sampling_level: ImportanceSamplingLevel = option(
        "token", "importance ratio per token (GRPO/PPO) or per sequence (GSPO: the geometric mean of the "
        "tokens' ratios; TRL's name)")
    filter_zero_variance: bool = option(True, "drop groups whose G rewards are all equal (zero advantage, no "
                                        "signal) from the update; off keeps them, as TRL does, where they still "
                                        "count in the loss's token normalisation")
    dynamic_sampling: bool = option(False, "DAPO dynamic sampling: refill dropped zero-variance groups with "
                                    "new prompts")
    max_sampling_rounds: int = option(3, "most extra rollout rounds per step for --dynamic-sampling")
    overlong_filter: bool = option(False, "mask truncated completions out of the loss (DAPO overlong filtering)")
    updates_per_batch: int = option(1, "mu: optimizer passes over each batch (>1 uses stored old log-probs)")
    minibatches: int = option(1, "optimizer steps per pass: the batch is split into this many minibatches")
    eval_every: int = option(0, "evaluate on held-out problems every N steps (0: off)")
    eval_problems: int = option(200, "held-out problems for --eval-every")
    ray: bool = option(False, "scale out on Ray: rollout actors running the engine, a data-parallel learner group")
    address: str = option("", "with --ray: the Ray cluster to join (HOST:PORT of `ray start --head`, or auto); "
                          "empty: start a local Ray bound to 127.0.0.1")
    rollout_workers: int = option(2, "with --ray: rollout actors (each holds a model copy and an engine)")
    learner_workers: int = option(1, "with --ray: learner actors (torch.distributed data parallel: gloo on CPU, "
                                  "nccl on CUDA)")

    def __post_init__(self):
        super().__post_init__()
        self.model = _check_model_dir(self.model, "--model")
        for name in ("rollout_workers", "learner_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.dynamic_sampling and not self.filter_zero_variance:
            raise ValueError("--dynamic-sampling refills the zero-variance groups it drops; it needs "
                             "--filter-zero-variance (drop --no-filter-zero-variance or --dynamic-sampling)")
        if self.ray and self.lora_rank:
            raise ValueError("--lora-rank with --ray is not supported yet (the rollout actors sync full weights); "
                             "drop --ray to train LoRA in one process")
        if self.address and not self.ray:
            raise ValueError(f"--address {self.address!r} needs --ray (the single-process run does not use a cluster)")
        if self.ray and self.rollout_workers > self.prompts_per_step:
            raise ValueError(
                f"--rollout-workers {self.rollout_workers} > --prompts-per-step {self.prompts_per_step}: each "
                "worker samples whole prompts, so some would idle; lower --rollout-workers or raise --prompts-per-step"
            )
        for name in ("prompts_per_step", "max_tokens", "updates_per_batch", "minibatches", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"--group-size {self.group_size}: group-relative advantages need at least 2 samples per prompt"
            )
        if self.prompts_per_step % self.minibatches:
            raise ValueError(
                f"--prompts-per-step {self.prompts_per_step} is not divisible by --minibatches {self.minibatches}; "
                "minibatches hold whole groups, so pick a divisor"
            )
        if self.temperature <= 0:
            raise ValueError(
                f"--temperature {self.temperature}: GRPO needs diverse samples within a group; "
                "use a temperature > 0 (1.0)"
            )
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError("--epsilon-low must be in [0, 1) and --epsilon-high >= 0")
        if self.beta < 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        if self.grad_accum != 1:
            raise ValueError("--grad-accum does not apply to grpo; use --minibatches to split a batch")

    @property
    def batch_completions(self) -> int:
        return self.prompts_per_step * self.group_size


def _check_batch(cfg) -> None:
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}; "
            "pick a batch size that is a multiple of it"
        )


def _check_model_dir(path: str, flag: str) -> str:
    """The checkpoint directory for `path`: a directory with config.json, or a registry name."""
    if not path:
        raise ValueError(f"{flag} is required: a checkpoint directory (e.g. the final/ of a pretrain run)")
    if (Path(path) / "config.json").is_file():
        return path
    from qiusuo.registry import resolve_model

    if not Path(path).exists() and "/" not in path:  # NAME[:TAG]
        try:
            return str(resolve_model(path))
        except ValueError as e:
            raise ValueError(f"{flag} {path!r}: {e}") from None
    raise ValueError(f"{flag} {path!r} is not a checkpoint directory (no config.json); "
                     "point it at a directory written by qiusuo (e.g. runs/pretrain/final) or a registry name")


def _flag(name: str) -> str:
    return name.replace("_", "-")


__all__ = ["TrainConfig", "PretrainConfig", "FinetuneConfig", "SFTConfig", "DistillConfig", "GRPOConfig"]

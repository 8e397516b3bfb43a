"""Training configurations (pydantic, one documented field each).

:class:`StepGRPOConfig` is Step-GRPO (method.md sec. 5) on TRL's ``GRPOTrainer``;
:class:`SFTConfig` is supervised fine-tuning on step targets with TRL's ``SFTTrainer``. Both
map onto the TRL config classes with :meth:`to_trl`; anything TRL offers that is not exposed
here can be passed through ``trl_overrides``. Multi-GPU / multi-node scale-out comes from an
``accelerate`` config (see docs/training.md), never from fields here.

``StepGRPOConfig.paper_preset()`` reproduces the released R1-Router setting: group size 5,
temperature 1.0, PPO-clip 0.2, lr 1e-6, token-level mean loss, no KL (the released code
computes but does not apply it), rewards as :meth:`RewardConfig.paper`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kbrouter.train.rewards import RewardConfig

StepKind = Literal["ret", "sub_answer", "final"]
ALL_STEP_KINDS: list[StepKind] = ["ret", "sub_answer", "final"]


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoRAConfig(_Cfg):
    """Parameter-efficient training with PEFT LoRA adapters (merged into the saved checkpoint)."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters ('all-linear' or module names)."
    )
    merge_on_save: bool = Field(
        True,
        description="Merge adapters into the base weights in the final checkpoint so the "
        "transformers backend loads it as a plain model.",
    )

    def to_peft(self) -> Any:
        """A ``peft.LoraConfig`` (None when disabled)."""
        if not self.enabled:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )


class _TrainCommon(_Cfg):
    model: str = Field(
        ...,
        description="Model to train: a Hugging Face hub id or checkpoint folder, a .gguf file "
        "(de-quantised by transformers), or a packaged GGUF preset such as 'smollm2-135m'.",
    )
    output_dir: Path = Field(
        ..., description="Run folder; the final checkpoint is written to <output_dir>/final."
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler_type: str = Field("constant", description="Transformers LR schedule name.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Samples per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per update.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the step samples.")
    max_steps: int = Field(-1, description="Optimizer updates; -1 = derived from epochs.")
    max_train_seconds: float | None = Field(
        None,
        gt=0,
        description="A bounded run: stop after the update during which this many seconds of "
        "training (in this process) have passed; the final checkpoint is saved as usual. "
        "None = no time limit.",
    )
    step_kinds: list[StepKind] = Field(
        default_factory=lambda: list(ALL_STEP_KINDS),
        description="Which step samples to train on: 'ret', 'sub_answer', 'final'.",
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    logging_steps: int = Field(10, gt=0, description="Log metrics every N updates.")
    save_steps: int = Field(
        0, ge=0, description="Save an intermediate checkpoint every N updates (0 = only final)."
    )
    bf16: bool = Field(False, description="bf16 mixed precision (GPU/XPU; keep off on CPU).")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory (worth it for large models only)."
    )
    use_cpu: bool | None = Field(
        None, description="Force CPU training; None = CPU only when no accelerator is present."
    )
    report_to: list[str] = Field(
        default_factory=list, description="Experiment trackers (e.g. ['tensorboard', 'wandb'])."
    )
    trl_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the TRL config class."
    )

    def _common_trl_kwargs(self) -> dict[str, Any]:
        use_cpu = self.use_cpu
        if use_cpu is None:
            import torch

            use_cpu = not torch.cuda.is_available()
        return {
            "output_dir": str(self.output_dir),
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_scheduler_type,
            "warmup_steps": self.warmup_steps,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_train_epochs": self.num_train_epochs,
            "max_steps": self.max_steps,
            "seed": self.seed,
            "data_seed": self.seed,
            "logging_steps": self.logging_steps,
            "save_strategy": "steps" if self.save_steps else "no",
            "save_steps": self.save_steps or 500,
            "bf16": self.bf16,
            "gradient_checkpointing": self.gradient_checkpointing,
            "use_cpu": use_cpu,
            "report_to": self.report_to or "none",
            "disable_tqdm": True,
        }


class SFTConfig(_TrainCommon):
    """Supervised fine-tuning on step targets (the teacher's response, or a response rendered
    from the target). The loss covers completion tokens only."""

    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    max_length: int | None = Field(
        4096, description="Truncate prompt+completion to this many tokens (None = no limit)."
    )

    def to_trl(self) -> Any:
        from trl import SFTConfig as TRLSFTConfig

        kw = self._common_trl_kwargs()
        kw.update(max_length=self.max_length, completion_only_loss=True)
        kw.update(self.trl_overrides)
        return TRLSFTConfig(**kw)


class OnPolicyConfig(_Cfg):
    """On-policy Step-GRPO: step prompts come from live rollouts of the current policy through
    the real engine and KBs (instead of the teacher-forced history), regenerated every round."""

    enabled: bool = Field(False, description="Regenerate step prompts from policy rollouts.")
    rounds: int = Field(3, gt=0, description="Rollout + train rounds.")
    questions_per_round: int = Field(
        64, gt=0, description="Training questions rolled out per round."
    )
    steps_per_round: int = Field(50, gt=0, description="GRPO updates per round.")
    rollout_temperature: float = Field(
        1.0, ge=0, description="Sampling temperature of the policy during rollouts."
    )
    max_retrieval_steps: int = Field(3, gt=0, description="Engine retrieval budget per question.")
    top_k: int = Field(
        5, gt=0, description="Evidence items per KB shown in rollouts (use the evaluation's)."
    )


class StepGRPOConfig(_TrainCommon):
    """Step-GRPO on TRL's GRPOTrainer: each step prompt is optimised independently."""

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (paper: 1e-6).")
    num_generations: int = Field(5, ge=2, description="Group size G (paper: 5).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (paper: 1.0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_completion_length: int = Field(512, gt=0, description="Max generated tokens per response.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL weight against the reference model (paper code: computed, not applied "
        "= 0). With beta > 0 the reference is reloaded from the model folder.",
    )
    epsilon: float = Field(0.2, gt=0, description="PPO clip range (paper: 0.2).")
    epsilon_high: float | None = Field(
        None, description="Upper clip (DAPO clip-higher); None = epsilon."
    )
    num_iterations: int = Field(1, gt=0, description="Policy updates per generation batch (mu).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="Loss aggregation; 'dapo' = token-level mean (paper/verl)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scaling: (r - mean) / std over the group (paper)."
    )
    per_device_train_batch_size: int = Field(
        5, gt=0, description="Completions per device per step (multiple of num_generations)."
    )
    steps_per_generation: int | None = Field(
        None, description="Optimizer micro-steps per generation batch (None = accumulation steps)."
    )
    rewards: RewardConfig = Field(default_factory=RewardConfig.paper)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    use_vllm: bool = Field(False, description="Generate with vLLM (GPU scale-out).")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM in the training processes, or a separate `trl vllm-serve`."
    )
    vllm_server_base_url: str | None = Field(
        None, description="URL of `trl vllm-serve` (server mode)."
    )
    log_completions: bool = Field(False, description="Log sampled completions (debugging).")

    @model_validator(mode="after")
    def _divisible(self) -> StepGRPOConfig:
        spg = self.steps_per_generation or self.gradient_accumulation_steps
        if (self.per_device_train_batch_size * spg) % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x "
                f"steps_per_generation ({spg}) must be divisible by num_generations "
                f"({self.num_generations})"
            )
        return self

    @classmethod
    def paper_preset(cls, model: str, output_dir: str | Path, **overrides: Any) -> StepGRPOConfig:
        """The released R1-Router Step-GRPO setting (method.md sec. 5), with overrides."""
        base: dict[str, Any] = {
            "model": model,
            "output_dir": Path(output_dir),
            "num_generations": 5,
            "temperature": 1.0,
            "top_p": 1.0,
            "beta": 0.0,
            "epsilon": 0.2,
            "learning_rate": 1e-6,
            "loss_type": "dapo",
            "scale_rewards": "group",
            "per_device_train_batch_size": 5,
            "rewards": RewardConfig.paper(),
        }
        base.update(overrides)
        return cls.model_validate(base)

    def to_trl(self) -> Any:
        from trl import GRPOConfig

        kw = self._common_trl_kwargs()
        kw.update(
            num_generations=self.num_generations,
            temperature=self.temperature,
            top_p=self.top_p,
            max_completion_length=self.max_completion_length,
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            num_iterations=self.num_iterations,
            loss_type=self.loss_type,
            scale_rewards=self.scale_rewards,
            steps_per_generation=self.steps_per_generation,
            use_vllm=self.use_vllm,
            vllm_mode=self.vllm_mode,
            log_completions=self.log_completions,
        )
        if self.vllm_server_base_url:
            kw["vllm_server_base_url"] = self.vllm_server_base_url
        if kw["epsilon_high"] is None:
            kw.pop("epsilon_high")
        kw.update(self.trl_overrides)
        return GRPOConfig(**kw)

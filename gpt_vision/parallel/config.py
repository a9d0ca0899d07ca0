"""How the model is distributed: the only config section the strategies read."""
from dataclasses import dataclass
from typing import Literal

from gpt_vision.errors import ConfigError
from gpt_vision.parallel.registry import check_name


@dataclass
class ParallelConfig:
    strategy: str = "single"  # a name in gpt_vision.parallel.registry.STRATEGIES
    # auto: bf16 on a CUDA device that supports it, fp32 elsewhere (CPU tests stay exact).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    # Optional DeepSpeed JSON for advanced keys; a key that contradicts ours is an error.
    deepspeed_config: str = ""
    # Collective timeout: a rank that stops participating fails the others after this long.
    timeout_s: int = 600

    def check(self) -> None:
        check_name(self.strategy)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and not (self.strategy == "deepspeed" and self.zero_stage == 3):
            raise ConfigError("offload_params", "needs strategy=deepspeed with zero_stage=3")
        if self.offload_optimizer and self.strategy != "deepspeed":
            raise ConfigError("offload_optimizer", "needs strategy=deepspeed (use fsdp_cpu_offload for fsdp)")
        if self.fsdp_cpu_offload and self.strategy != "fsdp":
            raise ConfigError("fsdp_cpu_offload", f"needs strategy=fsdp, got {self.strategy}")
        if self.deepspeed_config and self.strategy != "deepspeed":
            raise ConfigError("deepspeed_config", f"needs strategy=deepspeed, got {self.strategy}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"must be positive, got {self.timeout_s}")

"""Training hyper-parameters as one frozen data class (what `dpruner finetune` and the tolerance controller pass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TrainConfig:
    """SGD + Nesterov momentum, cosine schedule with linear warm-up, label smoothing and optional distillation.

    `epochs` may be fractional (0.25 = a quarter of the training split): the controller fine-tunes briefly between
    pruning steps. Defaults are a fine-tuning recipe (lr 0.01), not training from scratch.
    """

    epochs: float = 1.0
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    distill_alpha: float = 0.5  # weight of the distillation term; the hard-label loss gets 1 - alpha
    distill_temperature: float = 4.0
    device: str = "auto"  # auto: cuda when available, else cpu
    amp: bool | None = None  # None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    seed: int = 0
    quiet: bool = False

    def __post_init__(self):
        from dpruner import validate

        validate.epochs(self.epochs, "--epochs")
        validate.number(self.lr, "--lr", low=0, low_open=True, high=1e3)
        validate.number(self.momentum, "momentum", low=0, high=1, high_open=True)
        validate.number(self.weight_decay, "--weight-decay", low=0, high=1)
        validate.number(self.warmup_epochs, "--warmup-epochs", low=0, high=validate.MAX_EPOCHS)
        validate.number(self.label_smoothing, "--label-smoothing", low=0, high=1, high_open=True)
        validate.number(self.distill_alpha, "distill_alpha", low=0, high=1)
        validate.number(self.distill_temperature, "distill_temperature", low=0, low_open=True, high=1e3)
        validate.seed(self.seed)

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)

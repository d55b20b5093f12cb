"""Callbacks shared by all stages: resumable checkpoints and safetensors exports.

* `PeriodicCheckpoint` refreshes `last.ckpt` (weights, optimisers, loop state; what `ckpt_path="last"`
  resumes from) whenever the optimizer-step counter passes a multiple of `every_n_steps`. Unlike
  `ModelCheckpoint(every_n_train_steps=...)` it also fires when one batch takes several steps (the
  inter-shot DMD stage steps once per shot) and it needs no pre-step copy in manual optimisation.
* `SafetensorsExport` writes the stage's weights as `.safetensors` when training ends: the format the next
  stage and `ShotStreamPipeline` read. The module says what to export through `exports(state_dict)`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (a submodule name plus "."), with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


class PeriodicCheckpoint(ModelCheckpoint):
    """Keep `dirpath/last.ckpt` at most `every_n_steps` optimizer steps old."""

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=0, every_n_epochs=0)
        self.every_n_steps = every_n_steps
        self._saved_period = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_period = trainer.global_step // self.every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        period = trainer.global_step // self.every_n_steps
        if period > self._saved_period and not self._should_skip_saving_checkpoint(trainer):
            self._saved_period = period
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final state too, so that a finished stage resumes as finished."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SafetensorsExport(Callback):
    """At the end of training write `pl_module.exports(full_state_dict)` into `folder` (rank 0)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()  # gathered on rank 0 under FSDP "full"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            metadata = {"global_step": str(trainer.global_step), "stage": type(pl_module).__name__}
            for filename, tensors in pl_module.exports(state).items():
                tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
                save_file(tensors, str(self.folder / filename), metadata=metadata)
        trainer.strategy.barrier("safetensors_export")  # the next stage reads these files on every rank

"""Where a run is: everything besides weights, optimizer and RNG that a checkpoint must carry to resume exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainingProgress:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # over all ranks
    data_position: int = 0  # sequences consumed (all ranks): the next batch is a function of (seed, position)
    wandb_run_id: str | None = None
    num_processes: int = 1
    last_eval: dict = field(default_factory=dict)
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    bad_steps_in_a_row: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> TrainingProgress:
        """From trainer_state.json (every key is written by every checkpoint of this layout)."""
        return cls(**state)

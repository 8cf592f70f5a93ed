"""The processor's settings: fixed ones from the command line, live ones changed by the admin API."""
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

DEFAULT_TOKEN = "123"
DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_MAX_INFLIGHT = 800
DEFAULT_MAX_QUEUED = 500


@dataclass
class ProcessorConfig:
    fee: Decimal
    token: str = DEFAULT_TOKEN
    delay_ms: int = 0
    failing: bool = False
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_queued: int = DEFAULT_MAX_QUEUED
    # Where the processed payments are kept across restarts; None: in memory only.
    payments_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.fee.is_finite() or self.fee < 0:
            raise ValueError(f"fee must be a non-negative decimal, got {self.fee}")
        if self.delay_ms < 0:
            raise ValueError(f"delay must be non-negative, got {self.delay_ms}")
        if self.health_interval <= 0:
            raise ValueError(f"health interval must be positive, got {self.health_interval}")
        if self.max_inflight < 1 or self.max_queued < 0:
            raise ValueError("max inflight must be at least 1 and max queued non-negative")

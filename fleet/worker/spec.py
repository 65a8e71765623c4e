"""What a worker is started with: the supervisor writes it as JSON on the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fleet.config import HandlerConfig


@dataclass(frozen=True)
class WorkerSpec:
    config: HandlerConfig
    dispatch_endpoint: str
    parent_pid: int
    log_level: str = "info"
    log_file: str | None = None
    http_fds: tuple[int, ...] = ()  # the supervisor's --http listening sockets, inherited

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config.to_dict(),
                "dispatch_endpoint": self.dispatch_endpoint,
                "parent_pid": self.parent_pid,
                "log_level": self.log_level,
                "log_file": self.log_file,
                "http_fds": list(self.http_fds),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(HandlerConfig.from_dict(data["config"]), data["dispatch_endpoint"], data["parent_pid"],
                   data["log_level"], data.get("log_file"), tuple(data.get("http_fds", ())))

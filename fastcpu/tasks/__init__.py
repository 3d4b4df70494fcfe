"""The `task` config group: a benchmark's data, preprocessing, metric and loss behind one interface.

Importing this package registers every task in `TASKS`; adding a task is a module with a config dataclass
and a `Task` subclass decorated with `@TASKS.register(name, ConfigClass)`.
"""

from typing import Any

from fastcpu.tasks.base import TASKS, DataConfig, DataError, Features, Task
from fastcpu.tasks.squad import SquadConfig, SquadTask
from fastcpu.tasks.sst2 import Sst2Config, Sst2Task


def build_task_config(node: Any, key: str = "task") -> Any:
    """The validated config dataclass for the task named in `node.name`."""
    return TASKS.build(node, key)


def make_task(config: Any) -> Task:
    """Instantiate the registered Task class for a config built by `build_task_config`."""
    return TASKS.implementation(config)(config)


__all__ = [
    "TASKS",
    "DataConfig",
    "DataError",
    "Features",
    "SquadConfig",
    "SquadTask",
    "Sst2Config",
    "Sst2Task",
    "Task",
    "build_task_config",
    "make_task",
]

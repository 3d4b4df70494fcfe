"""`python -m fastcpu +experiment=NAME [key=value ...]`: a study of trials when the composed config has a
`search` section (every shipped experiment does), else one trial; `~search` runs one trial of it."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import search, trial  # noqa: F401  (register each config group's `base` before Hydra composes)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input: reported as one line, without a traceback."""
    from fastcpu_runtime import ArtifactError, BackendError

    from .config import ConfigError
    from .search import StudyFailed
    from .tasks.base import DataError
    from .teacher import TeacherError

    return (ConfigError, DataError, TeacherError, ArtifactError, BackendError, StudyFailed)


def quiet_library_noise() -> None:
    """Silence warnings the libraries print on every run that say nothing about the user's trial."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels and Triton, absent on CPU
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # inductor's int8 lowering


def compose_trial(overrides: list[str]) -> DictConfig:
    """A trial's config from the same conf/ tree as the command line's (Hydra's compose API)."""
    return hydra.compose(config_name="config", overrides=overrides)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from .search import Study
    from .trial import run_trial

    quiet_library_noise()
    hydra_config = HydraConfig.get()
    output_dir = Path(hydra_config.runtime.output_dir)
    try:
        if cfg.get("search") is None:
            run_trial(cfg, output_dir)
        else:
            print(Study(cfg, list(hydra_config.overrides.task), output_dir, compose_trial).run().text())
    except user_errors() as error:
        sys.exit(f"fastcpu: error: {error}")
    except KeyboardInterrupt:
        sys.exit("fastcpu: interrupted; completed trials are kept; the same command resumes the study")


if __name__ == "__main__":
    main()

"""`python -m fastcpu +experiment=NAME [key=value ...]`: run one trial with Hydra-composed configs."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input: reported as one line, without a traceback."""
    from fastcpu_runtime import ArtifactError, BackendError

    from .config import ConfigError
    from .tasks.base import DataError
    from .teacher import TeacherError

    return (ConfigError, DataError, TeacherError, ArtifactError, BackendError)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    import transformers

    from .trial import run_trial

    transformers.logging.set_verbosity_error()
    try:
        run_trial(cfg, Path(HydraConfig.get().runtime.output_dir))
    except user_errors() as error:
        sys.exit(f"fastcpu: error: {error}")


if __name__ == "__main__":
    main()

"""`python -m fastcpu +experiment=NAME [key=value ...]`: run one trial with Hydra-composed configs."""

from __future__ import annotations

import logging
import sys
import warnings
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


def quiet_library_noise() -> None:
    """Silence warnings the libraries print on every run that say nothing about the user's trial."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels and Triton, absent on CPU
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # inductor's int8 lowering


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from .trial import run_trial

    quiet_library_noise()
    try:
        run_trial(cfg, Path(HydraConfig.get().runtime.output_dir))
    except user_errors() as error:
        sys.exit(f"fastcpu: error: {error}")


if __name__ == "__main__":
    main()

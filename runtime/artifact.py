"""The deploy artifact: a self-describing, checksummed directory that the runtime can trust.

Writing is atomic (temporary sibling directory, manifest last, then a rename) so a crashed export never
leaves a directory that looks complete; loading verifies every listed file's sha256 before anything runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ArtifactError

FORMAT = "fastcpu-artifact"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.safetensors"
PACKED = "packed_4x1.safetensors"  # the sparse kernel's weight format, written for block-sparse int8 models
PACKED_FORMAT = "4x1-vnni-groups-v1"  # PackedWeight's fields (runtime/kernels/sparse.py), one set per Linear
SCHEMES = ("none", "bf16", "dynamic_int8", "static_int8", "qat_int8")
INT8_SCHEMES = ("static_int8", "qat_int8", "dynamic_int8")  # int8 weights + scales for the listed Linears
HEADS = ("question_answering", "sequence_classification", "token_classification")
SCALE_SUFFIX = ".weight_scale"
_TASK_KEYS = ("name", "head", "input_names", "output_names", "max_seq_length", "pad_token_id")
_HASH_CHUNK = 1 << 20
_REEXPORT = "re-export the model with fastcpu to get a complete artifact"


def sha256_file(path: Path) -> str:
    """Stream a file through sha256 so multi-GB weights do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Artifact:
    """A verified artifact directory; build the model, tokenizer and calibration data from it lazily."""

    def __init__(self, path: Path, manifest: dict[str, Any], model_config: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.model_config = model_config

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, task={self.task['name']!r}, scheme={self.scheme!r})"

    @property
    def task(self) -> dict[str, Any]:
        return self.manifest["task"]

    @property
    def head(self) -> str:
        return self.task["head"]

    @property
    def input_names(self) -> list[str]:
        return list(self.task["input_names"])

    @property
    def output_names(self) -> list[str]:
        return list(self.task["output_names"])

    @property
    def pad_token_id(self) -> int:
        return int(self.task["pad_token_id"])

    @property
    def max_seq_length(self) -> int:
        return int(self.task["max_seq_length"])

    @property
    def model_type(self) -> str:
        return self.manifest["model_type"]

    @property
    def scheme(self) -> str:
        return self.manifest["quantization"]["scheme"]

    @property
    def quantized_modules(self) -> list[str]:
        return list(self.manifest["quantization"].get("modules", []))

    @property
    def activation_ranges(self) -> dict[str, tuple[float, float]] | None:
        """{module: (min, max)} of each quantized Linear's input as quantization-aware training learned
        them, or None: static int8 then calibrates them on the artifact's calibration rows."""
        ranges = self.manifest["quantization"].get("activation_ranges")
        if ranges is None:
            return None
        missing = sorted(set(self.quantized_modules) - set(ranges))
        if missing:
            raise ArtifactError(
                f"{self.path}: quantization.activation_ranges lacks {missing[:3]}; {_REEXPORT}"
            )
        return {name: (float(ranges[name][0]), float(ranges[name][1])) for name in self.quantized_modules}

    @property
    def vocab_size(self) -> int:
        return int(self.model_config["vocab_size"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored tensors exactly as saved (int8 weights and their scales included)."""
        return load_file(self.path / WEIGHTS)

    def build_model(self, dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> torch.nn.Module:
        """An eval-mode Hugging Face module with the saved (possibly compacted) shapes, int8 dequantized."""
        from .modeling import build_model

        return build_model(self, dtype=dtype, attention=attention)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as error:
            raise ArtifactError(
                f"{self.path}: its tokenizer cannot be loaded ({error}); {_REEXPORT}"
            ) from None

    def packed_weights(self) -> dict[str, Any] | None:
        """{module: PackedWeight} stored at export for the sparse kernel, or None if the exporter stored
        none (not int8, or too few all-zero 4x1 blocks to pay; the sparse backend then packs at load)."""
        info = self.manifest["quantization"].get("packed")
        if not info:
            return None
        if info.get("format") != PACKED_FORMAT:
            raise ArtifactError(
                f"{self.path}: packed weights have format {info.get('format')!r}, this runtime reads"
                f" {PACKED_FORMAT!r}; {_REEXPORT}"
            )
        from .kernels.sparse import PackedWeight

        tensors = load_file(self.path / info["file"])
        try:
            return {name: PackedWeight.from_dict(tensors, f"{name}.") for name in self.quantized_modules}
        except KeyError as err:
            raise ArtifactError(
                f"{self.path / info['file']} has no tensor {err.args[0]}; {_REEXPORT}"
            ) from None

    def calibration(self) -> dict[str, torch.Tensor] | None:
        """Model inputs saved for static int8 calibration, or None if the exporter stored none."""
        file = self.path / CALIBRATION
        return dict(load_file(file)) if file.exists() else None


# --------------------------------------------------------------------------------------------- loading


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Open and verify an artifact; every problem becomes one ArtifactError that says how to fix it."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist (or is not a directory)")
    manifest = _read_manifest(root)
    _check_format(root, manifest)
    _check_files(root, manifest.get("files"))
    model_config = _read_json(root / CONFIG, what="model config")
    _check_consistency(root, manifest, model_config)
    return Artifact(root, manifest, model_config)


def _read_json(file: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{what} {file} is missing; {_REEXPORT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{what} {file} cannot be parsed ({err}); {_REEXPORT}") from err
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} {file} is not a JSON object; {_REEXPORT}")
    return data


def _read_manifest(root: Path) -> dict[str, Any]:
    if not (root / MANIFEST).is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST}: not a fastcpu artifact, or an export that did not finish; {_REEXPORT}"
        )
    return _read_json(root / MANIFEST, what="manifest")


def _check_format(root: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{root / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(
            f"{root} has format_version {version!r}, but this runtime supports"
            f" {list(SUPPORTED_FORMAT_VERSIONS)}; re-export with a fastcpu matching this runtime,"
            " or upgrade fastcpu_runtime"
        )
    try:
        _validate_manifest_fields(manifest)
    except ValueError as err:
        raise ArtifactError(f"{root / MANIFEST} is invalid: {err}; {_REEXPORT}") from None


def _check_files(root: Path, files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{root / MANIFEST} lists no files; {_REEXPORT}")
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            raise ArtifactError(f"{root / MANIFEST} does not list required file {required}; {_REEXPORT}")
    for name, expected in files.items():
        file = _safe_join(root, name)
        if not file.is_file():
            raise ArtifactError(f"file {name} listed in the manifest is missing from {root}; {_REEXPORT}")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"checksum mismatch for {name} in {root}: manifest has sha256 {expected}, file has {actual}."
                f" The file was modified or corrupted; {_REEXPORT}"
            )


def _safe_join(root: Path, name: str) -> Path:
    """Refuse manifest entries that escape the artifact directory."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name == MANIFEST:
        raise ArtifactError(f"{root / MANIFEST} lists an invalid file name {name!r}; {_REEXPORT}")
    return root / rel


def _check_consistency(root: Path, manifest: dict[str, Any], model_config: dict[str, Any]) -> None:
    config_type = model_config.get("model_type")
    if config_type and config_type != manifest["model_type"]:
        raise ArtifactError(
            f"{root}: manifest model_type {manifest['model_type']!r}"
            f" does not match config.json model_type {config_type!r}"
        )


# --------------------------------------------------------------------------------------------- writing


def write_artifact(
    directory: str | os.PathLike[str],
    *,
    manifest: Mapping[str, Any],
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Any,
    calibration: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artifact atomically and return its path.

    `manifest` carries model_type, task, quantization, sparsity (and optionally fastcpu_version); format,
    format_version, created and files are filled in here. Everything is written to a temporary sibling
    directory, the manifest last, and renamed into place only when complete.
    """
    target = Path(directory)
    _check_target(target, overwrite)
    full_manifest = _complete_manifest(manifest)
    tensors = _checked_tensors(state_dict, what="state_dict")
    _check_quantized_tensors(full_manifest, tensors)
    calib = None if calibration is None else _checked_calibration(calibration, full_manifest)
    packed = _packed_tensors(full_manifest, tensors)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_contents(staging, full_manifest, dict(model_config), tensors, tokenizer, calib, packed)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"cannot write artifact: {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ArtifactError(f"refusing to overwrite non-empty directory {target}; pass overwrite=True")


def _complete_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(dict(manifest)))  # deep copy; also proves it is JSON-serializable
    for key in ("format", "format_version", "created", "files"):
        out.pop(key, None)
    out.setdefault("fastcpu_version", _fastcpu_version())
    out.setdefault("sparsity", {})
    out["quantization"] = {"modules": [], **out.get("quantization", {})}
    try:
        _validate_manifest_fields(out)
    except ValueError as err:
        raise ArtifactError(f"invalid manifest: {err}") from None
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastcpu_version": out.pop("fastcpu_version"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {**header, **out}


def _fastcpu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastcpu")
    except PackageNotFoundError:
        return "unknown"


def _validate_manifest_fields(manifest: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing or malformed field."""
    if not isinstance(manifest.get("model_type"), str):
        raise ValueError("model_type must be a string")
    task = manifest.get("task")
    if not isinstance(task, dict):
        raise ValueError("task must be an object")
    missing = [k for k in _TASK_KEYS if k not in task]
    if missing:
        raise ValueError(f"task is missing {missing}")
    if task["head"] not in HEADS:
        raise ValueError(f"task.head {task['head']!r} is not one of {list(HEADS)}")
    if "input_ids" not in task["input_names"]:
        raise ValueError("task.input_names must include input_ids")
    quant = manifest.get("quantization")
    if not isinstance(quant, dict) or quant.get("scheme") not in SCHEMES:
        raise ValueError(f"quantization.scheme must be one of {list(SCHEMES)}")
    if not isinstance(quant.get("modules", []), list):
        raise ValueError("quantization.modules must be a list of module names")


def _checked_tensors(tensors: Mapping[str, Any], *, what: str) -> dict[str, torch.Tensor]:
    """Validate and make tensors safetensors-ready (CPU, contiguous, no shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"{what}[{name!r}] is a {type(value).__name__}, not a torch.Tensor")
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()  # safetensors refuses aliased tensors (e.g. tied weights)
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _check_quantized_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    for module in manifest["quantization"]["modules"]:
        weight, scale = tensors.get(f"{module}.weight"), tensors.get(f"{module}{SCALE_SUFFIX}")
        if weight is None or weight.dtype != torch.int8 or weight.ndim != 2:
            raise ArtifactError(f"quantized module {module}: {module}.weight must be a 2-D int8 tensor")
        if scale is None or scale.shape != (weight.shape[0],):
            raise ArtifactError(f"quantized module {module}: {module}{SCALE_SUFFIX} must have shape [out]")


def _checked_calibration(
    calibration: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    tensors = _checked_tensors(calibration, what="calibration")
    names = manifest["task"]["input_names"]
    unknown = sorted(set(tensors) - set(names))
    if unknown or "input_ids" not in tensors:
        raise ArtifactError(f"calibration must hold input_ids and only {names}, got {sorted(tensors)}")
    shape = tensors["input_ids"].shape
    for name, tensor in tensors.items():
        if tensor.ndim != 2 or tensor.shape != shape:
            raise ArtifactError(f"calibration[{name!r}] must be [N, S] like input_ids {tuple(shape)}")
        tensors[name] = tensor.to(torch.int64)
    return tensors


def _packed_tensors(
    manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The quantized Linears in the sparse kernel's packed format, when they are block-sparse enough for
    `auto` to pick the sparse backend; records the file in the manifest. Packing at export keeps it out of
    every deployment's start-up, and the checksum covers the packed bytes the kernel runs."""
    from .auto import SPARSE_MIN_BLOCK_SPARSITY, block_sparsity
    from .kernels.sparse import pack_linear

    modules = manifest["quantization"]["modules"]
    sparsity = block_sparsity(tensors[f"{name}.weight"] for name in modules)
    if sparsity is None or sparsity < SPARSE_MIN_BLOCK_SPARSITY:
        return None
    manifest["quantization"]["packed"] = {
        "file": PACKED,
        "format": PACKED_FORMAT,
        "block_sparsity": round(sparsity, 4),
    }
    packed: dict[str, torch.Tensor] = {}
    for name in modules:
        packed.update(pack_linear(tensors[f"{name}.weight"]).to_dict(f"{name}."))
    return packed


def _write_contents(
    staging: Path,
    manifest: dict[str, Any],
    model_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    tokenizer: Any,
    calibration: dict[str, torch.Tensor] | None,
    packed: dict[str, torch.Tensor] | None,
) -> None:
    tokenizer.save_pretrained(str(staging))  # first, so our config.json wins should it write one
    (staging / CONFIG).write_text(json.dumps(model_config, indent=2, sort_keys=True), encoding="utf-8")
    save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
    if calibration is not None:
        save_file(calibration, str(staging / CALIBRATION), metadata={"format": "pt"})
    if packed is not None:
        save_file(packed, str(staging / PACKED), metadata={"format": "pt"})
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {p.relative_to(staging).as_posix(): sha256_file(p) for p in files}
    _write_json_durably(staging / MANIFEST, manifest)


def _write_json_durably(file: Path, data: dict[str, Any]) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished staging directory onto target, parking any old contents until it succeeds."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)

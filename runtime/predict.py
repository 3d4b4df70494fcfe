"""Answer requests with a deployed artifact from the command line, one JSON object per answer.

    python -m fastcpu_runtime.predict ARTIFACT --question "Who ...?" --context "..."
    python -m fastcpu_runtime.predict ARTIFACT --text "a gripping film"
    python -m fastcpu_runtime.predict ARTIFACT < requests.jsonl   # {"question": ..., "context": ...} per line
    python -m fastcpu_runtime.predict ARTIFACT --buckets 64 128 256 < requests.jsonl  # short calls run short

Requests are read and checked against the artifact's task before the model is compiled, so bad input
costs nothing; answers are printed in request order.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterable
from typing import Any

from .artifact import load_artifact
from .auto import AUTO
from .backends import available_backends
from .errors import ArtifactError, BackendError
from .pipeline import load_pipeline, pipeline_class


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastcpu_runtime.predict",
        description="Answer requests with a fastcpu artifact; with no --question/--text, read JSON lines "
        "from stdin.",
    )
    parser.add_argument("artifact", help="artifact directory (a trial's artifact/)")
    parser.add_argument("--question", help="question (question-answering artifacts; needs --context)")
    parser.add_argument("--context", help="the passage holding the answer")
    parser.add_argument("--text", help="text to classify (classification artifacts)")
    parser.add_argument("--backend", default=AUTO, choices=[AUTO, *available_backends()])
    parser.add_argument("--batch-size", type=int, default=8, help="windows or texts per model call")
    parser.add_argument(
        "--buckets",
        type=int,
        nargs="+",
        default=[],
        help="sequence lengths to compile besides the artifact's; each call runs at the shortest that fits",
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    return parser


def _inline_request(args: argparse.Namespace) -> dict[str, str] | None:
    given = {name: getattr(args, name) for name in ("question", "context", "text")}
    given = {name: value for name, value in given.items() if value is not None}
    return given or None


def json_lines(lines: Iterable[str], source: str = "stdin") -> list[Any]:
    """One JSON value per non-blank line; a line that is not JSON is a ValueError naming `source` and it."""
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            requests.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} line {number} is not JSON ({error.msg})") from None
    return requests


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"torch\.")  # compiler chatter, not the user's concern
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        artifact = load_artifact(args.artifact)
        inline = _inline_request(args)
        requests = [inline] if inline is not None else json_lines(sys.stdin)
        pipeline_class(artifact).check_requests(requests)
        pipeline = load_pipeline(
            artifact, args.backend, batch_size=args.batch_size, buckets=args.buckets, threads=args.threads
        )
        answers = pipeline.predict(requests)
    except (ArtifactError, BackendError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for answer in answers:
        print(json.dumps(answer, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

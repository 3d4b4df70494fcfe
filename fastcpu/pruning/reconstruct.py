"""Pruning with least-squares reconstruction (in the line of Optimal Brain Surgeon, OBC and
SparseGPT): each encoder Linear is pruned in a few large steps, and the weights it keeps are solved
to reproduce its outputs on the inputs it has seen: for every row (or 4x1 row group) with kept columns K,
W[K] = H[K,K]^-1 H[K,:] W0, with H = sum of x x^T. Where gradual magnitude pruning needs thousands of
steps to recover, this leaves only the error no choice of the kept weights could remove, so a small
fine-tuning set is enough for the rest.

The student's input batches are kept from the (at most `max_batches`) training steps before a pruning
step (the model keeps training meanwhile); at that step every Linear is pruned, in forward order. There
are `stages` such steps up to `end`, the sparsity rising on the cubic schedule, with fine-tuning in
between, and the masks stay frozen for the rest of training. Four stages up to half of training are the
default: at 80% they keep F1 37.5 on the SQuAD sample where one shot (stages=1, end=0.1) keeps 30.8,
and SST-2 accuracy 85.09 where one shot keeps 84.40. Each Linear's kept weights
are solved on the inputs the model pruned so far gives it, towards the outputs the dense model gives
on its own inputs (OBC's and SparseGPT's sequential variant): on the SQuAD sample, one-shot 60% 4x1
keeps F1 44.4 of 55.4 before any fine-tuning this way, 35.1 when every Linear is solved on the dense
model's inputs alone.

Units are ranked by |w| * ||x_j|| (Wanda, Sun et al., 2023; a 4x1 unit sums its 4 weights'): on
correlated inputs it leaves a smaller error after the solve than magnitude, and much smaller than the
single-weight OBS saliency w^2 / [H^-1]_jj, which is blind to pruning many at once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fastcpu_runtime.architectures import layer_map, layers_prefix, transformer_layers

from ..config import check_range
from ..training import training_autocast
from .base import PRUNERS
from .masks import (
    BLOCK,
    MaskPruner,
    UnitPruning,
    expand_units,
    magnitude_mask,
    select_units,
    unit_view,
)


@dataclass
class ReconstructPruning(UnitPruning):
    name: str = "reconstruct"
    end: float = 0.5  # the last pruning step, after the max_batches steps whose inputs it solves on
    damping: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the solves stable
    max_batches: int = 8  # inputs kept from at most this many steps (24 instead of 8: F1 44.2, not 43.9)
    stages: int = 4  # pruning steps spread up to `end`, sparsity rising on the cubic schedule; 1: one shot

    def validate(self, key: str) -> None:
        super().validate(key)
        check_range(f"{key}.damping", self.damping, 0.0, low_open=True)
        check_range(f"{key}.max_batches", self.max_batches, 1)
        check_range(f"{key}.stages", self.stages, 1)


class _StageDone(Exception):
    """Stops a calibration forward pass once the stage's inputs are captured."""


@PRUNERS.register("reconstruct", ReconstructPruning)
class ReconstructPruner(MaskPruner):
    config: ReconstructPruning

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.model = model
        self.calibration: list[dict[str, torch.Tensor]] = []  # the student's inputs from start to end
        self.collecting, self.hook = False, None

    def _keep_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.collecting and len(self.calibration) < self.config.max_batches:
            self.calibration.append({k: v.detach() for k, v in kwargs.items() if torch.is_tensor(v)})

    def stage_steps(self) -> list[int]:
        """The steps that prune: `stages` of them spread evenly after `start`, the last at `end`."""
        start, end = self.config.steps(self.total_steps)
        stages = self.config.stages
        return sorted({start + round((k + 1) * (end - start) / stages) for k in range(stages)})

    def lr_restarts(self) -> list[int]:
        """With `rewind_lr`, the learning rate starts over at every pruning step (oBERT's rewinding)."""
        return self.stage_steps() if self.config.rewind_lr else []

    def before_step(self, step: int) -> None:
        start, _ = self.config.steps(self.total_steps)
        stage_steps = self.stage_steps()
        if step == 0 and stage_steps[-1] > start:
            self.hook = self.model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)
        if step in stage_steps:
            self.update_masks(self.config.sparsity_at(step, self.total_steps, self.config.sparsity))
        # inputs of the (at most) max_batches steps before each pruning step, none before `start`
        self.collecting = step >= start and any(0 < s - step <= self.config.max_batches for s in stage_steps)

    def update_masks(self, sparsity: float) -> None:
        """Prune every Linear to `sparsity` at once, solving the weights each keeps; with no inputs seen
        (training ended first), by magnitude. Units pruned before have no weight left, so they stay
        pruned as the sparsity rises."""
        if sparsity >= self.config.sparsity and self.hook is not None:  # the last stage
            self.hook.remove()
            self.hook = None
        self.collecting = False
        if self.calibration and sparsity > 0:
            self.prune_in_forward_order(sparsity)
        else:
            for name, module in self.linears.items():
                self.masks[name] = magnitude_mask(module.weight, sparsity, self.config.pattern)
        self.calibration = []
        self.sparsity = sparsity
        self.apply_masks()

    @torch.no_grad()
    def prune_in_forward_order(self, sparsity: float) -> None:
        """Layer by layer, stage by stage (Linears sharing an input, in forward order), solve the kept
        weights so that, on the inputs the already-pruned stages produce, the outputs match the dense
        model's outputs on its own inputs: later stages make up for the error of earlier ones instead
        of compounding it. Each layer runs on its input hidden states kept from the layer before, so
        the whole pass costs a few forward passes of the model."""
        training = self.model.training
        self.model.eval()
        layers = transformer_layers(self.model)
        dense_layers = copy.deepcopy(layers)
        calls = [_first_layer_call(self.model, layers[0], inputs) for inputs in self.calibration]
        pruned_stream = [_hidden_states(call) for call in calls]
        dense_stream = list(pruned_stream)
        targets = self.linear_sparsities(sparsity)
        prefix, stages = layers_prefix(self.model), layer_map(self.model).stages
        paths = tuple(path for stage in stages for path in stage)
        for index, (layer, dense_layer) in enumerate(zip(layers, dense_layers, strict=True)):
            # the dense layer's Linear inputs stay as they are while the pruned layer's stages change:
            # one pass over each batch captures them all, and the layer's output
            dense_runs = [
                _linear_inputs(dense_layer, paths, h, call, whole_layer=True)
                for h, call in zip(dense_stream, calls, strict=True)
            ]
            dense_inputs = [inputs for inputs, _ in dense_runs]
            for stage in stages:
                hessians, cross = _stage_statistics(layer, stage, calls, pruned_stream, dense_inputs)
                for path in stage:  # each leaves its pruned weights at zero for the stages after it
                    name = f"{prefix}.{index}.{path}"
                    self.masks[name] = reconstruct(
                        self.linears[name],
                        hessians[path],
                        targets[name],
                        self.config.pattern,
                        self.config.damping,
                        cross[path],
                    )
            pruned_stream = [_run_layer(layer, h, call) for h, call in zip(pruned_stream, calls, strict=True)]
            dense_stream = [output for _, output in dense_runs]
        self.model.train(training)

    def linear_sparsities(self, sparsity: float) -> dict[str, float]:
        """Each Linear's target: `sparsity` for all (`layer` scope), or (`global`) the share one threshold
        over the LAMP scores of every unit gives it (Lee et al., 2021: a unit's saliency over the sum of
        its own and every larger saliency of its Linear), with Wanda's |w|^2 E[x^2] as the saliency: the
        squared output error its removal costs, made comparable across Linears of different scales."""
        if self.config.scope == "layer":
            return dict.fromkeys(self.linears, sparsity)
        energy = _input_energy(self.model, self.linears, self.calibration)
        lamp = {
            name: lamp_scores(
                unit_view(module.weight.detach().float().pow(2) * energy[name], self.config.pattern)
            )
            for name, module in self.linears.items()
        }
        keep = select_units(lamp, sparsity, "global")
        return {name: 1.0 - kept.float().mean().item() for name, kept in keep.items()}


def lamp_scores(saliency: torch.Tensor) -> torch.Tensor:
    """LAMP score of every unit: its saliency over the sum of the saliencies not smaller than its own.
    A Linear's largest unit scores 1, so no Linear is pruned away entirely."""
    flat = saliency.flatten()
    order = flat.argsort()
    ascending = flat[order]
    not_smaller = ascending.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(flat)
    scores[order] = ascending / not_smaller.clamp_min(torch.finfo(flat.dtype).tiny)
    return scores.view_as(saliency)


@torch.no_grad()
def _input_energy(
    model: nn.Module, linears: dict[str, nn.Linear], calibration: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """E[x_j^2] of every input feature of every Linear over the calibration batches' tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(linears, 0)

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0.0) + x.pow(2).sum(0)
            counts[name] += x.shape[0]

        return hook

    hooks = [module.register_forward_pre_hook(accumulate(name)) for name, module in linears.items()]
    try:
        for inputs in calibration:
            with training_autocast("auto", next(model.parameters()).device):
                model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums[name] / counts[name] for name in linears}


def _first_layer_call(
    model: nn.Module, layer: nn.Module, inputs: dict[str, torch.Tensor]
) -> tuple[tuple, dict]:
    """The (args, kwargs) the model passes its first Transformer layer on `inputs` (every layer gets the
    same but for the hidden states); the forward pass stops there."""
    call = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call["args"], call["kwargs"] = args, kwargs
        raise _StageDone

    _run_until_done(lambda: model(**inputs), [layer.register_forward_pre_hook(keep, with_kwargs=True)])
    return call["args"], call["kwargs"]


def _run_until_done(run: Callable[[], object], hooks: list[RemovableHandle]) -> None:
    """`run()` until one of `hooks` raises _StageDone (or it ends); the hooks are removed either way."""
    try:
        run()
    except _StageDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()


def _hidden_states(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """The layer's output hidden states for input `hidden`, called as the model calls it, in the autocast
    training uses by default (bf16 where the device has it natively)."""
    args, kwargs = call
    args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
    with training_autocast("auto", hidden.device):
        output = layer(*args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _stage_statistics(
    layer: nn.Module,
    stage: tuple[str, ...],
    calls: list[tuple[tuple, dict]],
    pruned_stream: list[torch.Tensor],
    dense_inputs: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Over the calibration batches, per Linear of the stage (paths inside the layer): H = mean x x^T of
    its input x in the layer pruned so far, and C = mean x d^T against its input d in the dense layer.
    Linears that read the same input (query, key and value) share one product."""
    hessians = {path: 0.0 for path in stage}
    cross = {path: 0.0 for path in stage}
    rows = 0
    for call, pruned_in, d in zip(calls, pruned_stream, dense_inputs, strict=True):
        x, _ = _linear_inputs(layer, stage, pruned_in, call)
        products: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for path in stage:
            key = (id(x[path]), id(d[path]))
            if key not in products:
                products[key] = (x[path].T @ x[path], x[path].T @ d[path])
            hessians[path] = hessians[path] + products[key][0]
            cross[path] = cross[path] + products[key][1]
        rows += x[stage[0]].shape[0]
    return {p: h / rows for p, h in hessians.items()}, {p: c / rows for p, c in cross.items()}


def _linear_inputs(
    layer: nn.Module,
    paths: tuple[str, ...],
    hidden: torch.Tensor,
    call: tuple[tuple, dict],
    whole_layer: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The inputs of the Linears at `paths` when the layer runs on `hidden`, as [tokens, features] fp32,
    and the layer's output with `whole_layer`; without it the layer stops once they are captured."""
    captured: dict[str, torch.Tensor] = {}
    # one [tokens, features] copy of an input that several Linears read; the source is kept alive with
    # it, so that its id cannot be reused by another tensor during the pass
    by_input: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if path in captured:  # a Linear called again in the layer (DeBERTa's key on position embeddings)
                return
            source = args[0]
            if id(source) not in by_input:
                by_input[id(source)] = (source, source.detach().reshape(-1, source.shape[-1]).float())
            captured[path] = by_input[id(source)][1]
            if len(captured) == len(paths) and not whole_layer:
                raise _StageDone

        return hook

    hooks = [layer.get_submodule(path).register_forward_pre_hook(capture(path)) for path in paths]
    output = []
    _run_until_done(lambda: output.append(_run_layer(layer, hidden, call)), hooks)
    return captured, (output[0] if output else None)


@torch.no_grad()
def reconstruct(
    module: nn.Linear,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str,
    damping: float,
    cross: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune one Linear by |w| * ||x|| and solve its kept weights; returns the keep-mask and leaves the
    solved weights in the module. Without `cross`, the kept weights reproduce the dense outputs on the
    same inputs x (H = E[x x^T]); with cross = E[x d^T], the outputs the dense weights give on other
    inputs d (the dense model's, where x comes from a model already pruned upstream)."""
    weight = module.weight.detach().float()
    hessian = hessian.clone()
    saliency = unit_view(weight.abs() * hessian.diagonal().sqrt(), pattern)  # [rows or row groups, inputs]
    keep_units = keep_per_row(saliency, sparsity)
    # Inputs that were always zero get 1 (nothing to reproduce: their kept weights stay as they were);
    # the damping pulls every solve towards the original weights.
    diagonal = (hessian.diagonal() == 0).float() + damping * hessian.diagonal().mean()
    hessian.diagonal().add_(diagonal)
    reference = hessian if cross is None else cross.float().T + torch.diag(diagonal)
    targets = weight @ reference  # row r: E[x (w0_r . d)] (+ damping): the right-hand side of its solve
    solved = torch.zeros_like(weight)
    rows = BLOCK if pattern == "4x1" else 1
    for unit, kept in enumerate(keep_units):
        group, columns = slice(unit * rows, (unit + 1) * rows), kept.nonzero().squeeze(1)
        system = hessian[columns[:, None], columns]  # one gather of the kept block, not two
        solved[group, columns] = solve_symmetric(system, targets[group, columns].T).T
    module.weight.copy_(solved.to(module.weight.dtype))
    return expand_units(keep_units, pattern)


def solve_symmetric(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """system^-1 rhs for a damped Hessian block: by Cholesky (half the work of LU, a quarter less time on
    the MiniLM shapes), by LU where rounding left the block not positive definite."""
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(system, rhs)


def keep_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool keep-mask dropping the ceil(sparsity * columns) lowest scores of every row: at least the
    target, so that a model pruned to 50% is at the sparse backend's 50% threshold, not just under it."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    n_pruned = math.ceil(sparsity * scores.shape[1] - 1e-9)
    if n_pruned:
        keep.scatter_(1, torch.topk(scores, n_pruned, dim=1, largest=False).indices, False)
    return keep

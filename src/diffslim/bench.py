"""``bench``: several variants of one model, sampled on the same inputs in one process, one row each.

A method is a name with an optional argument (``full``, ``steps:10``); each registered builder turns
it into a :class:`Variant` (a pipeline and how to sample it). Later methods register themselves with
:func:`register_method`. Rows: ``method``, ``params``, ``macs_ratio`` (MACs of the whole sampling
run relative to ``full``), ``speedup`` (wall time of ``full`` over this row's, same run), ``psnr``,
``ssim`` (against the ``full`` outputs) and the task metrics of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffslim.errors import UserError

from diffslim.sample import SampleSpec, run_pipeline, sample


@dataclass
class BenchContext:
    """What builders get: the loaded model, the base sampling spec (the ``full`` run) and its default steps."""

    loaded: object
    base_spec: SampleSpec
    default_steps: int


@dataclass
class Variant:
    """A pipeline to sample and the spec to sample it with; ``params`` of its denoiser."""

    method: str
    pipe: object
    spec: SampleSpec
    params: int
    notes: str = ""
    cleanup: Optional[Callable[[], None]] = None


METHODS: dict[str, Callable[[Optional[str], BenchContext], Variant]] = {}
METHOD_HELP: dict[str, str] = {}


def register_method(name: str, help: str):
    """Register a bench method builder ``fn(arg, ctx) -> Variant`` under ``name`` (``name:ARG`` on the CLI)."""

    def deco(fn):
        METHODS[name] = fn
        METHOD_HELP[name] = help
        return fn

    return deco


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@register_method("full", "the unchanged model at its default step count")
def _full(arg, ctx: BenchContext) -> Variant:
    if arg:
        raise UserError("method 'full' takes no argument")
    return Variant("full", ctx.loaded.pipe, ctx.base_spec, _n_params(ctx.loaded.denoiser))


@register_method("steps", "steps:N, the same scheduler with N steps")
def _steps(arg, ctx: BenchContext) -> Variant:
    try:
        n = int(arg)
        assert n >= 1
    except (TypeError, ValueError, AssertionError):
        raise UserError(f"steps:N needs a positive integer N, got {arg!r}") from None
    return Variant(f"steps:{n}", ctx.loaded.pipe, ctx.base_spec.replace(num_inference_steps=n, timesteps=None),
                   _n_params(ctx.loaded.denoiser))


def parse_methods(text: str) -> list[tuple[str, Optional[str]]]:
    """``"full,steps:10"`` -> ``[("full", None), ("steps", "10")]``; unknown names raise ``ValueError``."""
    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        name, _, arg = item.partition(":")
        if name not in METHODS:
            raise UserError(f"unknown bench method {name!r}; accepted: {', '.join(sorted(METHODS))}")
        out.append((name, arg or None))
    if not out:
        raise UserError("no bench methods given; e.g. --methods full,steps:10")
    return out


def count_run_macs(pipe, spec: SampleSpec) -> int:
    """MACs of sampling ONE input of ``spec`` with ``pipe`` (every module the pipeline runs), FLOPs/2."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffslim.measure.macs import attention_flop_mapping

    one = spec.replace(inputs=spec.inputs[:1], seeds=spec.seeds[:1], batch_size=1)
    with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
        run_pipeline(pipe, one, [0])
    return int(fc.get_total_flops()) // 2


@dataclass
class BenchResult:
    rows: list[dict]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"rows": self.rows}


def run_bench(loaded, methods: str, evalset, default_steps: int = 50, scheduler: Optional[str] = None,
              batch_size: int = 16, metrics_fn: Optional[Callable] = None, progress: bool = True,
              repeats: int = 1) -> BenchResult:
    """Run every method on ``evalset``'s inputs; ``full`` always runs first as the reference.

    ``metrics_fn(outputs, reference) -> dict`` adds quality and task metrics to each row.
    Wall time is the best of ``repeats`` timed runs after one untimed warm-up batch.
    """
    if loaded.pipe is None:
        raise UserError(f"{loaded.source} has no pipeline to sample; bench needs a pipeline folder or zoo:NAME")
    parsed = parse_methods(methods)
    if ("full", None) in parsed:
        parsed.remove(("full", None))
    parsed.insert(0, ("full", None))
    base = SampleSpec(inputs=evalset.inputs, seeds=evalset.seeds, num_inference_steps=default_steps,
                      scheduler=scheduler, call_kwargs=dict(evalset.call_kwargs), batch_size=batch_size)
    ctx = BenchContext(loaded=loaded, base_spec=base, default_steps=default_steps)
    rows, outputs = [], {}
    full_time = full_macs = None
    for name, arg in parsed:
        variant = METHODS[name](arg, ctx)
        try:
            warm = variant.spec.replace(inputs=variant.spec.inputs[:1], seeds=variant.spec.seeds[:1])
            run_pipeline(variant.pipe, warm, [0])
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                out = sample(variant.pipe, variant.spec, show_progress=progress, description=variant.method)
                best = min(best, time.perf_counter() - t0)
            macs = count_run_macs(variant.pipe, variant.spec)
        finally:
            if variant.cleanup is not None:
                variant.cleanup()
        if full_time is None:
            full_time, full_macs, reference = best, macs, out
        row = {
            "method": variant.method,
            "params": variant.params,
            "macs_per_sample": macs,
            "macs_ratio": macs / full_macs,
            "seconds": best,
            "speedup": full_time / best,
        }
        if metrics_fn is not None:
            row.update(metrics_fn(out, reference))
        if variant.notes:
            row["notes"] = variant.notes
        rows.append(row)
        outputs[variant.method] = out
    return BenchResult(rows=rows, outputs=outputs)

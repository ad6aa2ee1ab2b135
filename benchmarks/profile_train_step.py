"""Profile one training step (forward + backward, fp32, CPU): where the time and the memory go, per model.

    python benchmarks/profile_train_step.py                                  # ~80 s on 2 cores
    python benchmarks/profile_train_step.py --models llama yoco-gret --seq-len 1024 --batch 1

Builds YOCO-SWA, YOCO-gRet, the Block Transformer and a same-size `LlamaForCausalLM` from configs
(`hf_yoco.bench.build_config`: same width, depth, heads, FFN and vocab; random weights, no downloads), runs warm-up
steps, then profiles `--steps` steps with `torch.profiler` (CPU activity). Each step is
`model(input_ids, labels=input_ids).loss.backward()` with the outputs dropped before backward, as Trainer does.

Time: the self CPU time of every profiled op (what `key_averages()` sums per op name) goes to one category: its
name's, through the explicit `OP_CATEGORIES` table (forward ops and their backward alike: `mm` and `MmBackward0`,
`silu` and `silu_backward`), or, for names the table leaves out (fills, copies, allocations), the category of the
nearest enclosing op that has one (the zero fill inside `nll_loss_backward` is loss). Two scopes override or refine names: every op inside hf_yoco's PyTorch gated-retention core
(`chunk_gated_retention` / `parallel_gated_retention`, whose matmuls, exp and cumsum have generic names), and the
backward of the autograd nodes that core creates, count as "gated retention"; ops of the LM head (`lm_head`, forward
and backward) are reported as an extra column (they stay in "matmul"). The self time of each step's own range
(Python and framework overhead between ops) is "other".

Memory: one more step is profiled with `profile_memory=True`; replaying its allocation and free events gives the
peak of live tensor bytes allocated during the step (above the parameters, which exist before it) and, at every
moment, the live bytes of the `[batch * seq, vocab]` fp32 tensors allocated by the LM head or the loss ops. The
arithmetic next to it: logits = batch * seq * vocab * 4 bytes; the cross-entropy keeps the log-softmax output for
backward, whose backward allocates d loss / d log-probs (`nll_loss_backward`, dense) and d loss / d logits
(`_log_softmax_backward_data`): 4 such tensors over a step, 3 of them live at once (log-probs, both gradients; the
logits themselves are freed when the step drops the model output). Profiling inflates small ops, so read the
shares in %, not the absolute milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from hf_yoco.bench import MODELS, build_config, check_models, machine_info

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "results" / "cpu-2core"
STEM = "profile_train_step"

MATMUL = "matmul (linear/GEMM)"
ATTENTION = "attention (sdpa/softmax)"
RETENTION = "gated retention"
LOSS = "loss (log_softmax/nll + backward)"
ELEMENTWISE = "elementwise (norm / RoPE / SwiGLU act / residual)"
OTHER = "other"
CATEGORIES = (MATMUL, ATTENTION, RETENTION, LOSS, ELEMENTWISE, OTHER)

# Normalized op names (see `base_op_name`) -> category. Anything not listed is "other": copies (`copy_`, `clone`),
# allocation (`empty`, `zeros`, `fill_`), embedding lookup and its backward, views, gradient accumulation, and the
# autograd engine's own bookkeeping.
OP_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(["mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "mv", "addmv", "dot"], MATMUL),
    **dict.fromkeys(
        [
            "scaled_dot_product_attention",
            "scaled_dot_product_flash_attention_for_cpu",
            "scaled_dot_product_flash_attention",
            "scaled_dot_product_efficient_attention",
            "scaled_dot_product_attention_math",
            "softmax",
            "safe_softmax",
        ],
        ATTENTION,
    ),
    "log_sigmoid": RETENTION,  # the retention gate; the core itself is tagged by scope
    **dict.fromkeys(["log_softmax", "nll_loss", "nll_loss2d", "cross_entropy_loss"], LOSS),
    **dict.fromkeys(
        [
            "add",  # residual, RoPE, gradient sums
            "sub",
            "rsub",
            "mul",  # RMSNorm, RoPE, SwiGLU gate
            "div",
            "neg",  # RoPE rotate_half
            "pow",  # RMSNorm
            "rsqrt",
            "sqrt",
            "mean",
            "sum",  # reductions of broadcast gradients (norm weights)
            "silu",  # SwiGLU activation
            "gelu",
            "sigmoid",
            "tanh",
            "exp",
            "cos",
            "sin",
            "cat",  # RoPE rotate_half
            "slice",  # its backward (slice_backward): RoPE halves
            "native_layer_norm",
            "layer_norm",
            "rms_norm",
            "where",
            "masked_fill",
        ],
        ELEMENTWISE,
    ),
}

SCOPE_PREFIX = "hf_yoco_profile::"
STEP_RANGE = SCOPE_PREFIX + "train_step"
EVALUATE_PREFIX = "autograd::engine::evaluate_function: "
RETENTION_FUNCTIONS = ("chunk_gated_retention", "parallel_gated_retention")


@dataclass
class ProfileSettings:
    """Model size and step shape (defaults: d=512, 8 layers, 8q/4kv heads, FFN 1376, vocab 32000, 2 x 512 tokens).

    The model-size fields are `hf_yoco.bench.BenchSettings`'s, so `build_config` takes these settings as they are.
    """

    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1376
    vocab_size: int = 32000
    sliding_window: int = 256
    block_length: int = 4
    batch: int = 2
    seq_len: int = 512
    warmup: int = 2
    steps: int = 3
    threads: int = 2
    top_ops: int = 12
    models: list[str] = field(default_factory=lambda: list(MODELS))


# ------------------------------------------------------------------------------------------------ op categories


def base_op_name(name: str) -> str:
    """`aten::_log_softmax_backward_data`, `LogSoftmaxBackward0` and `autograd::engine::evaluate_function:
    LogSoftmaxBackward0` all become `log_softmax`."""
    name = name.removeprefix(EVALUATE_PREFIX).removeprefix("aten::")
    if "::" in name:  # torch::autograd::AccumulateGrad and other namespaced events
        return name.lower()
    if name[:1].isupper():  # autograd node: CamelCase + Backward<N>
        name = re.sub(r"Backward\d*$", "", name)
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    name = name.strip("_")
    for suffix in ("_backward_data", "_backward", "_forward", "_nd"):
        name = name.removesuffix(suffix)
    return name


def op_category(name: str, tag: str | None = None) -> str:
    """Category of one op's self time; `tag` is the profiling scope it ran in (`gated_retention`, `lm_head`)."""
    if tag == "gated_retention":
        return RETENTION
    if name == STEP_RANGE:
        return OTHER
    if name == SCOPE_PREFIX + "lm_head":
        return MATMUL
    return OP_CATEGORIES.get(base_op_name(name), OTHER)


# ------------------------------------------------------------------------------------------------ scopes


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class Scopes:
    """Tags the forward ops of chosen callables with a `record_function` range and remembers the autograd nodes they
    create (by sequence number), so the backward ops of those nodes get the same tag."""

    def __init__(self) -> None:
        self.backward_tags: dict[int, str] = {}

    def wrap(self, tag: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            with record_function(SCOPE_PREFIX + tag):
                out = fn(*args, **kwargs)
            self._remember(tag, out, [*_tensors(args), *_tensors(kwargs)])
            return out

        return scoped

    def _remember(self, tag: str, out: Any, inputs: list[torch.Tensor]) -> None:
        """Walk back from the outputs' grad_fn to the inputs' grad_fn: every node in between was created inside."""
        stop = {t.grad_fn._sequence_nr() for t in inputs if t.grad_fn is not None}
        todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or hasattr(node, "variable"):  # AccumulateGrad: a parameter leaf, not created here
                continue
            number = node._sequence_nr()
            if number in stop or number in self.backward_tags:
                continue
            self.backward_tags[number] = tag
            todo.extend(next_node for next_node, _ in node.next_functions)

    @contextlib.contextmanager
    def installed(self, model: torch.nn.Module) -> Iterator[None]:
        """Scope the model's LM head and hf_yoco's PyTorch gated-retention core (restored on exit)."""
        from hf_yoco.models import modeling_yoco

        patched = [(modeling_yoco, name, getattr(modeling_yoco, name)) for name in RETENTION_FUNCTIONS]
        head = model.get_output_embeddings()
        try:
            for module, name, fn in patched:
                setattr(module, name, self.wrap("gated_retention", fn))
            head.forward = self.wrap("lm_head", head.forward)
            yield
        finally:
            for module, name, fn in patched:
                setattr(module, name, fn)
            del head.forward


def _walk(roots: list, children: Callable, name: Callable, sequence_nr: Callable, scopes: Scopes) -> Iterator:
    """(event, tag, category) for every event under `roots`, depth first.

    The tag comes from the nearest scoped ancestor (a forward range or the backward of a node created inside it).
    The category is the event's own (`op_category`) unless that is "other": then it is its nearest categorized
    ancestor's, so the helpers an op calls count for it (`nll_loss_backward`'s zero fill is loss, the `zeros` and
    `copy_` of `slice_backward` are RoPE's backward, the allocations inside an op are that op's).
    """
    stack = [(root, None, OTHER) for root in reversed(roots)]
    while stack:
        event, tag, category = stack.pop()
        event_name = name(event)
        if event_name.startswith(SCOPE_PREFIX) and event_name != STEP_RANGE:
            tag = event_name.removeprefix(SCOPE_PREFIX)
        elif event_name.startswith(EVALUATE_PREFIX) and sequence_nr(event) in scopes.backward_tags:
            tag = scopes.backward_tags[sequence_nr(event)]
        own = op_category(event_name, tag)
        category = own if own != OTHER else category
        yield event, tag, category
        stack.extend((child, tag, category) for child in reversed(children(event)))


# ------------------------------------------------------------------------------------------------ measurement


def time_breakdown(prof: profile, scopes: Scopes, steps: int) -> dict:
    """Self CPU time per category (and per op) from the profiled events, with the key_averages total as a check."""
    events = [e for e in prof.events() if e.name != "[memory]"]
    roots = [e for e in events if e.cpu_parent is None]
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[tuple[str, str], float] = {}
    lm_head_us = 0.0
    walked = _walk(roots, lambda e: e.cpu_children, lambda e: e.name, lambda e: e.sequence_nr, scopes)
    for event, tag, category in walked:
        self_us = event.self_cpu_time_total
        by_category[category] += self_us
        key = (event.name, category)
        by_op[key] = by_op.get(key, 0.0) + self_us
        if tag == "lm_head":
            lm_head_us += self_us
    total = sum(by_category.values())
    key_averages_total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "profiled_ms_per_step": total / 1e3 / steps,
        "key_averages_ms_per_step": key_averages_total / 1e3 / steps,
        "share_pct": {c: 100 * us / total for c, us in by_category.items()},
        "ms_per_step": {c: us / 1e3 / steps for c, us in by_category.items()},
        "lm_head_pct": 100 * lm_head_us / total,
        "top_ops": [
            {"op": op, "category": category, "ms_per_step": us / 1e3 / steps, "share_pct": 100 * us / total}
            for (op, category), us in top
        ],
    }


def memory_breakdown(prof: profile, scopes: Scopes, vocab_tensor_bytes: int) -> dict:
    """Replay the step's allocations: peak live bytes, and live `[B*T, vocab]` LM-head/loss tensors over time."""
    tree = prof.profiler.kineto_results.experimental_event_tree()

    def children(event: Any) -> list:
        return event.children

    def sequence_nr(event: Any) -> int:
        return getattr(event.extra_fields, "sequence_number", -1)

    allocations = []  # (time, ptr, bytes, is_vocab_tensor)
    for event, tag, category in _walk(tree, children, lambda e: e.name, sequence_nr, scopes):
        if event.name == "[memory]":
            size = event.extra_fields.alloc_size
            is_vocab = (tag == "lm_head" or category == LOSS) and size == vocab_tensor_bytes
            allocations.append((event.start_time_ns, event.extra_fields.ptr, size, is_vocab))
    allocations.sort(key=lambda a: a[0])

    live: dict[int, tuple[int, bool]] = {}
    total = vocab_live = 0
    peak = vocab_at_peak = vocab_max = vocab_allocated = 0
    for _, ptr, size, is_vocab in allocations:
        if size > 0:
            live[ptr] = (size, is_vocab)
            total += size
            vocab_live += size if is_vocab else 0
            vocab_allocated += size if is_vocab else 0
        elif ptr in live:  # frees of blocks allocated before the step are not the step's
            freed, was_vocab = live.pop(ptr)
            total -= freed
            vocab_live -= freed if was_vocab else 0
        if total > peak:
            peak, vocab_at_peak = total, vocab_live
        vocab_max = max(vocab_max, vocab_live)
    return {
        "step_peak_bytes": peak,
        "vocab_tensors_live_at_peak_bytes": vocab_at_peak,
        "vocab_tensors_max_live_bytes": vocab_max,
        "vocab_tensors_allocated_bytes": vocab_allocated,
    }


def train_step(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """One step without optimizer: zero the gradients, forward with labels, backward (the output is dropped first)."""
    model.zero_grad(set_to_none=True)
    with record_function(STEP_RANGE):
        loss = model(input_ids=input_ids, labels=input_ids).loss  # the output (and its logits) is freed here
        loss.backward()


def profile_model(name: str, settings: ProfileSettings, progress: Callable[[], None] = lambda: None) -> dict:
    """Warm up, profile `settings.steps` steps (time), then one step with `profile_memory=True`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = build_config(name, settings, settings.seq_len)
    model = AutoModelForCausalLM.from_config(config).train()
    input_ids = torch.randint(0, settings.vocab_size, (settings.batch, settings.seq_len))
    scopes = Scopes()
    with scopes.installed(model):
        warmup_s = []
        for _ in range(settings.warmup):
            start = time.perf_counter()
            train_step(model, input_ids)
            warmup_s.append(time.perf_counter() - start)
            progress()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(settings.steps):
                train_step(model, input_ids)
                progress()
            profiled_s = (time.perf_counter() - start) / settings.steps
        timing = time_breakdown(prof, scopes, settings.steps)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(model, input_ids)
        progress()
    model.zero_grad(set_to_none=True)

    logits_bytes = settings.batch * settings.seq_len * settings.vocab_size * 4
    memory = memory_breakdown(prof, scopes, logits_bytes)
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    param_bytes = sum(params.values())
    memory.update(
        param_bytes=param_bytes,
        total_peak_bytes=param_bytes + memory["step_peak_bytes"],
        logits_bytes=logits_bytes,
        loss_path_bytes_materialized=4 * logits_bytes,
        loss_path_bytes_live_at_once=3 * logits_bytes,
    )
    memory["loss_path_fraction_of_total_peak"] = (
        memory["vocab_tensors_live_at_peak_bytes"] / memory["total_peak_bytes"]
    )
    memory["loss_path_max_fraction_of_total_peak"] = 3 * logits_bytes / memory["total_peak_bytes"]
    return {
        "model": name,
        "config_class": type(config).__name__,
        "warmup_step_s": warmup_s,
        "step_s_unprofiled": statistics.median(warmup_s[1:] or warmup_s) if warmup_s else None,
        "step_s_profiled": profiled_s,
        **timing,
        "top_ops": timing["top_ops"][: settings.top_ops],
        "memory": memory,
    }


# ------------------------------------------------------------------------------------------------ reports


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def markdown_report(results: dict) -> str:
    """Tables: time share per category, memory of the logits/loss path, top ops per model."""
    s = results["settings"]
    short = {MATMUL: "matmul", ATTENTION: "attention", RETENTION: "gated ret.", LOSS: "loss", ELEMENTWISE: "eltwise"}
    lines = [
        "# One training step (forward + backward), fp32, CPU",
        "",
        f"d={s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']}q/{s['num_kv_heads']}kv heads, "
        f"FFN {s['intermediate_size']}, vocab {s['vocab_size']}, batch {s['batch']} x {s['seq_len']} tokens, "
        f"{s['threads']} threads, torch {results['machine'].get('torch')}; {s['steps']} profiled steps after "
        f"{s['warmup']} warm-up steps. Shares are of the profiled self CPU time (Python overhead between ops is "
        "in `other`). Each op's self time goes to its name's category (`OP_CATEGORIES`), or, for names outside the "
        "table (fills, copies, allocations), to that of the nearest enclosing op; ops inside hf_yoco's gated-retention "
        "core and the backward of the nodes it creates are `gated retention`.",
        "",
        "## Time: share of the step per category (%)",
        "",
        "| model | "
        + " | ".join(short.get(c, c) for c in CATEGORIES)
        + " | LM head GEMM | LM head + loss | step s | unprofiled |",
        "|---" * (len(CATEGORIES) + 5) + "|",
    ]
    for r in results["models"]:
        shares = r["share_pct"]
        cells = [f"{shares[c]:.1f}" for c in CATEGORIES]
        cells += [f"{r['lm_head_pct']:.1f}", f"{r['lm_head_pct'] + shares[LOSS]:.1f}", f"{r['step_s_profiled']:.2f}"]
        cells.append(f"{r['step_s_unprofiled']:.2f}" if r["step_s_unprofiled"] is not None else "-")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Columns: " + "; ".join(f"{v} = {k}" for k, v in short.items()) + ". `LM head GEMM`: every op of `lm_head`, "
        "forward and backward (already inside `matmul`). `step s`: wall time of a profiled step; `unprofiled`: median warm-up step after the first.",
        "",
        "## Memory: the `[batch * seq, vocab]` fp32 logits/loss tensors vs the step's peak (MiB)",
        "",
        "| model | params | step peak (above params) | params + step peak | logits | 3 x logits (arith.) | "
        "measured max live | live at peak | share of params + peak |",
        "|---" * 9 + "|",
    ]
    for r in results["models"]:
        m = r["memory"]
        lines.append(
            f"| {r['model']} | {_mib(m['param_bytes'])} | {_mib(m['step_peak_bytes'])} | {_mib(m['total_peak_bytes'])}"
            f" | {_mib(m['logits_bytes'])} | {_mib(m['loss_path_bytes_live_at_once'])}"
            f" | {_mib(m['vocab_tensors_max_live_bytes'])} | {_mib(m['vocab_tensors_live_at_peak_bytes'])}"
            f" | {100 * m['loss_path_fraction_of_total_peak']:.1f}% |"
        )
    lines += [
        "",
        "Counted: logits = batch * seq * vocab * 4 bytes; the loss keeps the log-softmax output for backward, whose "
        "backward allocates d loss/d log-probs (`nll_loss_backward`, dense) and d loss/d logits "
        "(`_log_softmax_backward_data`): 4 such tensors per step, at most 3 live at once (the logits are freed "
        "when the step drops the model output). `step peak`: peak of live tensor bytes allocated during a step "
        "(`profile_memory=True`, allocations and frees replayed); `measured max live` / `live at peak`: the "
        "vocab-sized tensors allocated by the LM head or the loss ops, at their own maximum / at the step's "
        "peak. Gradients are allocated inside the step and counted in its peak; no optimizer state.",
        "",
        "## Top ops per model (self CPU time)",
    ]
    for r in results["models"]:
        lines += ["", f"**{r['model']}**", "", "| op | category | ms/step | % |", "|---|---|---|---|"]
        for op in r["top_ops"]:
            lines.append(f"| `{op['op']}` | {op['category']} | {op['ms_per_step']:.1f} | {op['share_pct']:.1f} |")
    return "\n".join(lines) + "\n"


def run_profile(settings: ProfileSettings, output_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Profile every model of `settings.models`; write `profile_train_step.{json,md}` to `output_dir` if given."""
    from tqdm.auto import tqdm

    check_models(settings.models)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(), "models": []}
    results["notes"] = {
        "share_pct": "self CPU time per category / all profiled self CPU time (step ranges included)",
        "memory": "vocab tensors = [batch*seq, vocab] fp32 tensors allocated under lm_head or loss ops: logits, "
        "log-softmax output, d loss/d log-probs, d loss/d logits; step_peak_bytes = peak live bytes allocated "
        "during a step, params excluded (total_peak_bytes adds them)",
    }
    results["machine"]["load_avg_before"] = os.getloadavg()  # other processes distort per-op times (OpenMP waits)
    start = time.perf_counter()
    try:
        bar = tqdm(total=len(settings.models) * (settings.warmup + settings.steps + 1), disable=not progress)
        with bar:
            for name in settings.models:
                bar.set_description(name)
                results["models"].append(profile_model(name, settings, lambda: bar.update()))
                gc.collect()  # the previous model's memory is gone before the next one is built
    finally:
        torch.set_num_threads(threads)
    results["wall_s"] = time.perf_counter() - start
    results["machine"]["load_avg_after"] = os.getloadavg()
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / f"{STEM}.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / f"{STEM}.md").write_text(markdown_report(results))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ProfileSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=defaults.models, help="models to profile")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=defaults.num_kv_heads)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--sliding-window", type=int, default=defaults.sliding_window, help="YOCO-SWA window")
    parser.add_argument("--block-length", type=int, default=defaults.block_length, help="Block Transformer block")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="unprofiled steps first")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="profiled steps (time)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    parser.add_argument("--top-ops", type=int, default=defaults.top_ops, help="ops listed per model")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where JSON + markdown go")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the results dict (also written to `--output-dir`)."""
    args = parse_args(argv)
    settings = ProfileSettings(
        **{k: v for k, v in vars(args).items() if k in ProfileSettings.__dataclass_fields__ and k != "models"},
        models=list(args.models),
    )
    results = run_profile(settings, args.output_dir, progress=not args.no_progress)
    print(markdown_report(results))
    print(f"wrote {args.output_dir}/{STEM}.json and {STEM}.md in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for hf_yoco models, and a CPU/gloo check script.

`fsdp2_shard(model, mesh)` shards every decoder layer (the classes in `model._no_split_modules`: YOCO's
self-/cross-decoder layers, the Block Transformer's block- and token-decoder layers) and then the root, which keeps
the embeddings, YOCO's `global_kv` projections and the LM head. Caches are plain tensors built during the forward
pass, so generation works on a sharded model (all ranks must call it together).

Run the check (CPU, gloo) with:

    torchrun --nproc_per_node 2 -m hf_yoco.distributed --model yoco --steps 3 --output-dir outputs/fsdp2

Every rank trains the sharded model for `--steps` AdamW steps on its own slice of a Hamlet batch, while an unsharded
replica trains on the whole batch; the script records the losses, the largest parameter difference to the replica
and a greedy generation (with the model's own cache), in `summary_rank<r>.json`.

Multi-GPU training through `Trainer` uses accelerate's FSDP / DeepSpeed integration instead (see the README); on CPU
accelerate ignores FSDP settings, which is why this script calls `fully_shard` directly.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .models.modeling_common import output_cache


def fsdp2_shard(model: torch.nn.Module, mesh=None, **kwargs) -> torch.nn.Module:
    """`fully_shard` each decoder layer (`model._no_split_modules`), then the root. Returns the (same) model."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} does not list its decoder layers in `_no_split_modules`")
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as full tensors (DTensor shards gathered)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def main(argv: list[str] | None = None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import set_seed

    import hf_yoco  # noqa: F401
    from hf_yoco import data as data_lib
    from hf_yoco.training import tiny_config

    p = argparse.ArgumentParser(description="FSDP2 training check on CPU (run under torchrun)")
    p.add_argument("--model", default="yoco")
    p.add_argument("--self-decoder", default="gated_retention")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-per-rank", type=int, default=2)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--data-dir", default=str(data_lib.default_data_dir()))
    p.add_argument("--output-dir", default="outputs/fsdp2")
    args = p.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:  # rank 0 builds the cached data first, the other ranks then read the cache
        dist.barrier()
    dataset, tok = data_lib.prepare_data("hamlet", args.data_dir, "bpe", args.vocab_size, args.block_size)
    if rank == 0:
        dist.barrier()

    set_seed(0)
    config = tiny_config(
        args.model,
        vocab_size=len(tok),
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=2,
        num_kv_heads=1,
        self_decoder_type=args.self_decoder,
        sliding_window=8,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    reference = copy.deepcopy(model)  # unsharded replica, trained on the global batch
    mesh = init_device_mesh("cpu", (world,))
    fsdp2_shard(model, mesh)
    n_dtensor = sum(type(p).__name__ == "DTensor" for p in model.parameters())

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    b = args.batch_per_rank
    losses, ref_losses = [], []
    for step in range(args.steps):
        rows = dataset["train"][step * b * world : (step + 1) * b * world]["input_ids"]
        batch = torch.tensor(rows)
        mine = batch[rank * b : (rank + 1) * b]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()  # FSDP2 reduce-scatters (averages) the gradients over ranks
        opt.step()
        opt.zero_grad()
        ref_loss = sum(reference(input_ids=c, labels=c).loss for c in batch.split(b)) / world
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
        ref_losses.append(ref_loss.item())

    full = _full_params(model)
    ref = dict(reference.named_parameters())
    max_diff = max((full[n] - ref[n].detach()).abs().max().item() for n in full)

    model.eval()
    reference.eval()
    prompt = torch.tensor([dataset["test"][0]["input_ids"][:12]])
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        ref_gen = reference.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    summary = dict(
        rank=rank,
        world_size=world,
        model_type=config.model_type,
        dtensor_params=n_dtensor,
        params=len(full),
        losses=losses,
        reference_losses=ref_losses,
        max_param_diff_vs_reference=max_diff,
        generated=gen.sequences[0].tolist(),
        reference_generated=ref_gen[0].tolist(),
        cache_type=type(output_cache(gen)).__name__,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary_rank{rank}.json").write_text(json.dumps(summary, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""LoRA fine-tuning of a saved hf_yoco model on another real text, then reload, merge and save.

    python examples/train.py --output-dir outputs/base                      # a base model trained on Hamlet
    python examples/lora_finetune.py --base outputs/base/final --plays macbeth --output-dir outputs/lora

Steps: (1) `get_peft_model(base, LoraConfig(task_type="CAUSAL_LM"))` with the target modules `import hf_yoco`
registers (no `target_modules` needed) and the stock Trainer on the new text (`hf_yoco.training.train --lora`);
(2) the adapter is saved to `<output-dir>/final` (a few hundred kB); (3) it is reloaded onto a fresh base with
`PeftModel.from_pretrained`, generates with the model's own cache, is folded in with `merge_and_unload()` (same
logits) and the merged model is saved as a plain checkpoint to `<output-dir>/merged`.
Without `--base`, a base model is first trained on `--base-plays` for `--base-steps` steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_yoco  # noqa: F401  (model types + default LoRA targets)
from hf_yoco import data as data_lib
from hf_yoco import output_cache
from hf_yoco.training import add_arguments, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)  # all `hf-yoco train` flags (data, model, training, LoRA)
    parser.add_argument("--base", default=None, help="saved base model (with tokenizer); trained first if omitted")
    parser.add_argument("--base-plays", default="hamlet", help="text for the base model when --base is omitted")
    parser.add_argument("--base-steps", type=int, default=200)
    parser.add_argument("--prompt", default="KING.\nWhat news")
    parser.set_defaults(plays="macbeth", output_dir="outputs/lora", max_steps=100, learning_rate=5e-3)
    return parser.parse_args(argv)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, dataset, batch_size: int = 8) -> float:
    """Mean token loss over packed blocks (each row is a full block, so a plain mean over batches is exact)."""
    model.eval()
    losses = []
    for i in range(0, len(dataset), batch_size):
        ids = torch.tensor(dataset[i : i + batch_size]["input_ids"])
        losses.append(model(input_ids=ids, labels=ids).loss.item() * len(ids))
    return sum(losses) / len(dataset)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.base is None:  # train a base model on another text first
        base_args = argparse.Namespace(**{**vars(args), "plays": args.base_plays, "lora": False})
        base_args.output_dir, base_args.max_steps = str(out / "base"), args.base_steps
        args.base = train(base_args)["final_dir"]

    # 1-2. LoRA fine-tune with the stock Trainer; default target modules come from hf_yoco's PEFT registration.
    lora_args = argparse.Namespace(**{**vars(args), "init_from": args.base, "lora": True, "tokenizer": args.base})
    summary = train(lora_args)
    adapter_dir = summary["final_dir"]

    # 3. Reload the adapter onto a fresh base model, generate, merge, compare, save.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(args.base).eval()
    dataset, _ = data_lib.prepare_data(
        args.plays, args.data_dir, args.base, args.vocab_size, args.block_size, args.eval_fraction, args.extra_text
    )
    eval_set = dataset["test"].select(range(min(len(dataset["test"]), args.max_eval_samples or 64)))
    base_loss = eval_loss(base, eval_set)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    lora_loss = eval_loss(peft_model, eval_set)

    prompt = tokenizer(args.prompt, return_tensors="pt")
    gen = peft_model.generate(**prompt, max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
    ids = torch.tensor([eval_set[0]["input_ids"]])
    unmerged_logits = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    merged_logits = merged(input_ids=ids).logits
    merged_gen = merged.generate(**prompt, max_new_tokens=32, do_sample=False)
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")

    result = dict(
        adapter_dir=adapter_dir,
        merged_dir=str(out / "merged"),
        trainable_params=summary["trainable_params"],
        params=summary["params"],
        eval_loss_base=base_loss,
        eval_loss_lora=lora_loss,
        merged_max_abs_logit_diff=(merged_logits - unmerged_logits).abs().max().item(),
        same_greedy_tokens=bool(torch.equal(gen.sequences, merged_gen)),
        cache_type=type(output_cache(gen)).__name__,
        sample=tokenizer.decode(gen.sequences[0], skip_special_tokens=True),
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)

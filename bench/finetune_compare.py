"""Compare finished runs on the same small data set, e.g. a fine-tune, a LoRA fine-tune and the same training from
scratch (docs/finetuning.md): the transformer's val loss and the shapes checker's caption faithfulness, over all val
prompts and over the val prompts that name one colour (the one the fine-tune's source never saw); and what each
costs: the transformer's weight bytes on disk, and, measured here one config after another in a fresh process
each, seconds per training step and peak memory over `--steps` steps of the run's own recipe.

    python -m bench.finetune_compare --colour purple configs/finetune/finetune.yaml configs/finetune/lora.yaml \
        configs/finetune/scratch.yaml

Each run must have finished its transformer and evaluate stages. `--set KEY=VALUE` applies to every config;
`CONFIG;KEY=VALUE;...` adds overrides to one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource

from dalle_core.images import decode_png
from data_sources.shapes import faithfulness
from pipeline.config import load_config
from pipeline.stage_table import stage_keys
from storage.parquet import read_shard


def run_row(config: str, overrides: list[str], colour: str) -> dict:
    """One run's numbers: transformer steps and val losses, faithfulness (the top-1 of N by CLIP and a random
    candidate, as the evaluation reports them) over all val prompts and over those naming `colour`."""
    cfg = load_config(config, overrides)
    store, keys = cfg.store.open(), stage_keys(cfg)
    transformer = store.require("transformer", keys["transformer"])
    store.require("evaluate", keys["evaluate"])
    report = store.read_json(store.path("evaluate", keys["evaluate"], "evaluation.json"))
    rows = read_shard(store, store.path("evaluate", keys["evaluate"], "generations.parquet"),
                      ["prompt", "candidate", "rank", "image"]).to_pylist()
    val = list(dict.fromkeys(r["prompt"] for r in rows))[:report["generation"]["prompts"]]  # val prompts first
    named = {p for p in val if colour in p.split()}
    picks = {"top1": [r for r in rows if r["prompt"] in named and r["rank"] == 0],
             "random": [r for r in rows if r["prompt"] in named and r["candidate"] == 0]}  # i.i.d.: the first is random
    colour_faith = {k: faithfulness([decode_png(r["image"]) for r in v], [r["prompt"] for r in v])["overall.all"]
                    if v else float("nan") for k, v in picks.items()}
    m, faith = transformer["metrics"], report["faithfulness"]
    weights = sum(size for name, size in transformer["files"].items() if name.endswith(".safetensors"))
    return {"bytes": weights, "lora": "lora" in transformer, "run": config, "from": (transformer.get("init_from") or {}).get("spec", "scratch"),
            "steps": transformer["steps"], "val_loss": m["val_loss"], "bits": m["val_bits_per_image_token"],
            "top1": faith["top1"]["overall.all"], "random": faith["random"]["overall.all"], "prompts": len(named),
            "colour_top1": colour_faith["top1"], "colour_random": colour_faith["random"]}


def training_cost(config: str, overrides: list[str], steps: int) -> dict:
    """Seconds per step and peak memory of `steps` training steps of the run's transformer recipe (its model, its
    start: init_from's weights, frozen parts or LoRA adapters, its optimizer, batch size and precision), on its own
    token shards, on the CPU. Run it in a fresh process: `peak_mb` is the process's peak RSS, `held_mb` the tensors
    one step holds (`held_bytes`)."""
    import torch

    from dalle_core.images import compact_size
    from dalle_core.loader import StreamOrder, decode_tokens
    from dalle_core.train import fit, make_optimizer
    from dalle_core.transformer import DALLE, transformer_step
    from pipeline.fine_tuning import start_model
    from pipeline.training import batch_stream
    from storage.parquet import shard_paths

    cfg = load_config(config, overrides)
    store, keys, section = cfg.store.open(), stage_keys(cfg), cfg.transformer
    m = store.require("pretokenize", keys["pretokenize"])
    c = section.dalle_config(text_vocab=m["vocab_size"], text_len=m["text_len"], pad_id=m["pad_id"],
                             image_vocab=m["codebook_size"], image_grid=compact_size(*m["grid"]))
    torch.manual_seed(section.train.seed)
    model = DALLE(c)
    start = start_model(cfg, "transformer", model, store)
    t = dataclasses.replace(section.train, max_steps=steps, max_minutes=None, val_every=None)
    optimizer = make_optimizer(model, t)
    batches = batch_stream(cfg, store, shard_paths(store, "pretokenize", keys["pretokenize"], "train"),
                           ["text_tokens", "image_tokens"], decode_tokens, t.batch_size, torch.device("cpu"),
                           StreamOrder(seed=t.seed, window_rows=section.shuffle_buffer))
    step_fn = transformer_step(section.caption_dropout, c.pad_id, t.seed)
    result = fit(model, batches, t, optimizer, step_fn)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"s_per_step": result.elapsed_s / result.step, "peak_mb": peak_kb / 1024, "trainable": start.trainable,
            "total": start.total,
            "held_mb": held_bytes(model, optimizer, step_fn, next(iter(batches)), t, c.seq_len) / 2**20}


def held_bytes(model, optimizer, step_fn, batch: dict, t, seq_len: int) -> int:
    """The bytes of the tensors one training step holds at its peak, measured on the tensors themselves: the
    weights, what autograd keeps for the backward pass (`saved_tensors_hooks`), the gradients and the optimizer's
    state; each storage counted once. A CPU has no allocator statistics (a GPU's would be
    `torch.cuda.max_memory_allocated`), and its peak RSS mixes in the allocator's caching."""
    import torch

    from dalle_core.device import autocast

    held: dict[int, int] = {}

    def keep(x):
        held[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x), autocast(t.precision, torch.device("cpu"), seq_len):
        loss = step_fn(model, batch, 0)[0]
    loss.backward()
    for p in model.parameters():
        keep(p)
        if p.grad is not None:
            keep(p.grad)
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim():
                keep(value)
    optimizer.zero_grad(set_to_none=True)
    return sum(held.values())


def _cost_in_fresh_process(config: str, overrides: list[str], steps: int) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(training_cost, (config, overrides, steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", metavar="CONFIG[;KEY=VALUE...]",
                    help="run configs whose transformer and evaluate stages have finished")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override applied to every config (repeatable)")
    ap.add_argument("--colour", default="purple", help="report the val prompts naming this colour apart")
    ap.add_argument("--steps", type=int, default=30, help="training steps timed per config (0: no timing)")
    args = ap.parse_args()
    rows = []
    for spec in args.configs:
        config, *own = spec.split(";")
        row = {**run_row(config, [*args.overrides, *own], args.colour), "run": spec}
        if args.steps:
            row.update(_cost_in_fresh_process(config, [*args.overrides, *own], args.steps))
        rows.append(row)
    c = args.colour
    print(f"| run | starts from | steps | val loss (nats) | val bits / image token | faithfulness top-1 of N | "
          f"random candidate | {c} prompts | {c}: top-1 | {c}: random | weights on disk | parameters trained | "
          "s / step | tensors a step holds (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = "adapter" if r["lora"] else "model"
        cost = (f"{r['trainable']:,} of {r['total']:,} | {r['s_per_step']:.3f} | {r['held_mb']:.0f} | "
                f"{r['peak_mb']:.0f}" if "s_per_step" in r else "| | |")
        print(f"| `{r['run']}` | {r['from']} | {r['steps']} | {r['val_loss']:.3f} | {r['bits']:.3f} | "
              f"{r['top1']:.3f} | {r['random']:.3f} | {r['prompts']} | {r['colour_top1']:.3f} | "
              f"{r['colour_random']:.3f} | {r['bytes'] / 1e6:.2f} MB ({kind}) | {cost} |")


if __name__ == "__main__":
    main()

"""Compare finished runs on the same small data set, e.g. a fine-tune and the same training from scratch
(docs/finetuning.md): the transformer's val loss and the shapes checker's caption faithfulness, over all val
prompts and over the val prompts that name one colour (the one the fine-tune's source never saw).

    python -m bench.finetune_compare --colour purple configs/finetune/finetune.yaml configs/finetune/scratch.yaml

Each run must have finished its transformer and evaluate stages. `--set KEY=VALUE` applies to every config;
`CONFIG;KEY=VALUE;...` adds overrides to one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

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
    return {"run": config, "from": (transformer.get("init_from") or {}).get("spec", "scratch"),
            "steps": transformer["steps"], "val_loss": m["val_loss"], "bits": m["val_bits_per_image_token"],
            "top1": faith["top1"]["overall.all"], "random": faith["random"]["overall.all"], "prompts": len(named),
            "colour_top1": colour_faith["top1"], "colour_random": colour_faith["random"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", metavar="CONFIG[;KEY=VALUE...]",
                    help="run configs whose transformer and evaluate stages have finished")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override applied to every config (repeatable)")
    ap.add_argument("--colour", default="purple", help="report the val prompts naming this colour apart")
    args = ap.parse_args()
    rows = []
    for spec in args.configs:
        config, *own = spec.split(";")
        rows.append(run_row(config, [*args.overrides, *own], args.colour))
    c = args.colour
    print(f"| run | starts from | steps | val loss (nats) | val bits / image token | faithfulness top-1 of N | "
          f"random candidate | {c} prompts | {c}: top-1 | {c}: random |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['run']}` | {r['from']} | {r['steps']} | {r['val_loss']:.3f} | {r['bits']:.3f} | "
              f"{r['top1']:.3f} | {r['random']:.3f} | {r['prompts']} | {r['colour_top1']:.3f} | "
              f"{r['colour_random']:.3f} |")


if __name__ == "__main__":
    main()

"""Trainable parameter counts of TinyLoRA, LoRA-XS and LoRA on Qwen2.5, Llama 3.x and Qwen3, and the
tying that fits ~13 parameters (the paper's headline on Qwen2.5-7B), computed by
`tinylora.count_trainable` on meta-device models of the real shapes (no weights, no memory).

    python param_counts.py      # the markdown table of docs/method.md §8
"""

import torch

from model import ModelConfig, Transformer
from tinylora import TinyLoRAConfig, count_trainable, tie_choices


def _shapes(vocab, family, **models):
    """{name: ModelConfig} from (layers, hidden, MLP, query heads, kv heads, head_dim) per model, as
    in the models' config.json files."""
    return {name: ModelConfig(vocab_size=vocab, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                              num_attention_heads=H, num_key_value_heads=KV, head_dim=hd, model_type=family,
                              attention_bias=family == "qwen2", qk_norm=family == "qwen3")
            for name, (L, D, I, H, KV, hd) in models.items()}


QWEN25 = _shapes(151936, "qwen2", **{"0.5B": (24, 896, 4864, 14, 2, 64), "1.5B": (28, 1536, 8960, 12, 2, 128),
                                     "3B": (36, 2048, 11008, 16, 2, 128), "7B": (28, 3584, 18944, 28, 4, 128)})
LLAMA3 = _shapes(128256, "llama", **{"3.2-1B": (16, 2048, 8192, 32, 8, 64), "3.2-3B": (28, 3072, 8192, 24, 8, 128),
                                     "3.1-8B": (32, 4096, 14336, 32, 8, 128)})
QWEN3 = _shapes(151936, "qwen3", **{"0.6B": (28, 1024, 3072, 16, 8, 128), "1.7B": (28, 2048, 6144, 16, 8, 128),
                                    "4B": (36, 2560, 9728, 32, 8, 128), "8B": (36, 4096, 12288, 32, 8, 128)})
MODELS = {**{f"Qwen2.5-{k}": v for k, v in QWEN25.items()}, **{f"Llama-{k}": v for k, v in LLAMA3.items()},
          **{f"Qwen3-{k}": v for k, v in QWEN3.items()}}

PAPER_SETTINGS = {"TinyLoRA u=1 n_tie=16": TinyLoRAConfig(n_tie=16), "TinyLoRA u=1 n_tie=4": TinyLoRAConfig(n_tie=4),
                  "TinyLoRA u=1 n_tie=1": TinyLoRAConfig(), "TinyLoRA u=2 n_tie=1": TinyLoRAConfig(u=2),
                  "LoRA-XS r=2": TinyLoRAConfig(method="lora-xs"), "LoRA r=1": TinyLoRAConfig(method="lora", r=1)}


def parameter_table(budget=13):
    """Markdown table of trainable counts per model (rows) and setting (columns), and the TinyLoRA
    setting with u = 1 closest to `budget` parameters (`tie_choices`: the least tying that fits)."""
    lines = ["| model | layers | modules | " + " | ".join(PAPER_SETTINGS) + f" | ~{budget} parameters: u, n_tie -> count |",
             "|---|---:|---:|" + "---:|" * len(PAPER_SETTINGS) + "---|"]
    for name, cfg in MODELS.items():
        with torch.device("meta"):
            model = Transformer(cfg)
        u, n_tie, count = tie_choices(model, budget)[0]
        counts = " | ".join(f"{count_trainable(model, config):,}" for config in PAPER_SETTINGS.values())
        lines.append(f"| {name} | {cfg.num_hidden_layers} | {7 * cfg.num_hidden_layers} | {counts} | "
                     f"u={u}, n_tie={n_tie} -> {count} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(parameter_table())

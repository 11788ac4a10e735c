"""Which capture mechanism takes which model: torch.fx symbolic tracing against torch.export (non-strict, batch
dimension dynamic), on hub models built from small configs and on models as users write them. Per model and
mechanism: captured or the first line of the error, seconds for one training-mode capture, and for export whether
the graph reads the model's own Parameter objects. Writes results.md beside this file.

    .venv/bin/python benchmarks/capture/compare.py        # from the repository root; about a minute
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.user_models
from tests import user_models  # noqa: E402

from locallearn.models.capture import PickedOutput  # noqa: E402  (the wrapper both tracers take)
from locallearn.models.graph_trace import trace_export, trace_fx  # noqa: E402
from locallearn.models.hub import transformers_model  # noqa: E402

IMAGES = torch.randn(2, 1, 28, 28)
TOKENS = torch.randint(0, 64, (2, 16))


def models() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    hub = [
        ("ResNetForImageClassification", {"embedding_size": 8, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]}),
        (
            "ViTForImageClassification",
            {"image_size": 28, "patch_size": 7, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2},
        ),
        ("ConvNextForImageClassification", {"num_stages": 3, "hidden_sizes": [16, 32, 64], "drop_path_rate": 0.2}),
        (
            "SwinForImageClassification",
            {"image_size": 28, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
        ),
    ]
    out = [(f"hub {name}", transformers_model(name, 10, 1, **kw), IMAGES) for name, kw in hub]
    gpt2 = transformers_model("GPT2LMHeadModel", vocab_size=64, n_positions=32, n_embd=32, n_layer=4, n_head=2)
    out.append(("hub GPT2LMHeadModel", gpt2, TOKENS))
    for name in ("resnet50", "stochastic_depth"):
        out.append((f"user {name}", getattr(user_models, name)(), IMAGES))
    out.append(("user unet", user_models.unet(), torch.randn(2, 1, 32, 32)))  # (its three poolings need 8 | side)
    out.append(("user vit", user_models.vit(image=28), IMAGES))
    out.append(("user gated (data-dependent)", user_models.gated(), IMAGES))
    return out


def attempt(trace, wrapper: torch.nn.Module, x: torch.Tensor) -> tuple[str, float, object]:
    start = time.perf_counter()
    try:
        gm, _ = trace(wrapper, x, True)
    except Exception as e:  # CaptureError: one line
        return "fails: " + str(e).split(" (", 1)[-1][:110].replace("|", "/"), time.perf_counter() - start, None
    return "captures", time.perf_counter() - start, gm


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, model, x in models():
        wrapper = PickedOutput(model, None)
        fx_result, fx_s, _ = attempt(trace_fx, wrapper, x)
        ex_result, ex_s, gm = attempt(trace_export, wrapper, x)
        own = ""
        if gm is not None:
            mine = {id(p) for p in model.parameters()}
            read = [p for p in gm.parameters()]
            own = f"{sum(id(p) in mine for p in read)} of {len(mine)}"
        rows.append(f"| {name} | {fx_result} | {fx_s:.2f} | {ex_result} | {ex_s:.2f} | {own} |")
        print(rows[-1], flush=True)
    head = [
        "# Capture: torch.fx against torch.export (non-strict)",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: "
        "`.venv/bin/python benchmarks/capture/compare.py`. Seconds: one training-mode capture (a run captures "
        "twice, train and eval mode). Own parameters: how many of the model's Parameter objects the exported "
        "graph reads (all of them means the units train the user's model itself).",
        "",
        "| model | torch.fx | s | torch.export | s | own parameters |",
        "|---|---|---|---|---|---|",
    ]
    Path(__file__).with_name("results.md").write_text("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()

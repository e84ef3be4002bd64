"""What the engine holds against what the planner prices, on the real-width model on the CPU.

    python -m bench.footprint_memory [--json OUT]

The model: moshi's 7B config with 2 transformer layers and 2 depformer layers (dim 4,096: the 7B's rows and
heads) and the full-size Mimi, random weights, LM in bf16 as a GPU serves it. For each footprint the engine
is built for real (MoshiEngine, streaming at batch 1 and 3) and measured: the bytes of every parameter and
buffer (each storage once), and the bytes its streaming states hold, per session (batch 3 less batch 1,
halved, so what does not grow with the batch cancels). The planner's figures come from `voice-agent plan`'s
own `price` on the same config built on the meta device. What a session holds at rest is its KV rings, Mimi's
rings, offsets and token cache; the planner's count adds, for an fp8 cache, one layer's rings read back in
bf16 (a transient of each step, `lm_kv_transient`) and the depformer's per-step cache, so those two are
shown apart.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from procs.model.footprint import Footprint
from procs.model.torch_setup import prepare_torch

FOOTPRINTS = {
    "as stored": Footprint(),
    "int8": Footprint(weights="int8"),
    "fp8 KV": Footprint(kv="fp8"),
    "context 1500": Footprint(context=1500),
    "int8 + fp8 KV + context 1500": Footprint(weights="int8", context=1500, kv="fp8"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    prepare_torch("cpu")
    from moshi.models import loaders

    from procs.config import DEFAULTS
    from procs.model.capacity import held_state_bytes, session_bytes, weight_bytes
    from procs.model.checkpoints import checkpoint_info_from_dir
    from procs.model.compact import apply_footprint
    from procs.model.demo import demo_checkpoint_dir, mimi_codebooks
    from procs.model.moshi_engine import MoshiEngine
    from procs.plan import price

    lm_kwargs = dict(loaders._lm_kwargs) | {"num_layers": 2, "depformer_num_layers": 2}
    num_codebooks = mimi_codebooks(lm_kwargs)
    meta_mimi = loaders.get_mimi(None, loaders._mimi_config, num_codebooks=num_codebooks, device="meta")
    meta_lm = loaders.get_moshi_lm(None, lm_kwargs=dict(lm_kwargs), device="meta", dtype=torch.bfloat16)
    planned = {(r.weights, r.kv, r.context): r for r in price(
        meta_mimi, meta_lm, reduced_context=1500, gpus=(("any", 80.0),),
        gpu_memory_fraction=DEFAULTS.gpu_memory_fraction)}
    torch.manual_seed(0)
    mimi = loaders.get_mimi(None, loaders._mimi_config, num_codebooks=num_codebooks, device="cpu")
    base = loaders.get_moshi_lm(None, lm_kwargs=dict(lm_kwargs), device="cpu", dtype=torch.bfloat16)
    tokenizer = checkpoint_info_from_dir(demo_checkpoint_dir()).get_text_tokenizer()  # text is not read here
    rows = []
    for name, footprint in FOOTPRINTS.items():
        lm = apply_footprint(copy.deepcopy(base), footprint)
        held = {}
        for batch in (1, 3):
            engine = MoshiEngine(mimi, lm, tokenizer, batch_size=batch, demo_weights=True)
            held[batch] = held_state_bytes([engine.lm_gen, *lm.modules(), *mimi.modules()])[1]
            for module in (engine.lm_gen, lm, mimi):  # streaming_forever has no exit: drop the states
                module._stop_streaming()
            del engine
        measured_session = (held[3] - held[1]) / 2
        measured_weights = weight_bytes(mimi, lm)
        counted = session_bytes(mimi, lm)
        row = planned[("int8" if footprint.weights == "int8" else "bf16", "fp8" if footprint.kv == "fp8"
                       else "bf16", lm.context)]
        at_rest = row.session_mb * 1e6 - counted.lm_kv_transient - counted.depformer
        rows.append({
            "footprint": name, "weights_measured": measured_weights, "weights_planned": row.weights_gb * 1e9,
            "session_measured": measured_session, "session_planned": row.session_mb * 1e6,
            "session_planned_at_rest": at_rest, "transient": counted.lm_kv_transient,
            "depformer": counted.depformer,
            "weights_diff": measured_weights / (row.weights_gb * 1e9) - 1,
            "session_diff_at_rest": measured_session / at_rest - 1,
        })
        print(f"{name}: weights {measured_weights / 1e9:.4f} GB measured, {row.weights_gb:.4f} planned; per "
              f"session {measured_session / 1e6:.3f} MB held, {at_rest / 1e6:.3f} MB planned at rest "
              f"(+{counted.lm_kv_transient / 1e6:.3f} MB fp8 read-back, +{counted.depformer / 1e6:.3f} MB "
              f"depformer per step)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which image encoding of the base rendering to condition the TinyNeRF head on: a leave-one-out check.

For every training view of a scene, the nearest other training view in f-space (each column standardised,
as the head does) is found, and the cosine between its overfitted delta and the view's own is averaged. A
larger mean cosine says f tells more about which delta a view needs. Candidates: EfficientNet-Lite0's 1,280
pooled features, its 1,000 ImageNet logits, and the mean rendered colour (the core's default f).

    python -m benchmarks.nerf_f_choice --data-root ../shared/data --scenes boxes spheres
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from benchmarks import task_nerf as tn


def nearest_delta_cosine(f: torch.Tensor, delta: torch.Tensor) -> float:
    """Mean cosine between each row's delta and the delta of its nearest other row in standardised f."""
    z = (f - f.mean(0)) / f.std(0).clamp_min(1e-8)
    dist = torch.cdist(z, z)
    dist.fill_diagonal_(float("inf"))
    return float(torch.nn.functional.cosine_similarity(delta, delta[dist.argmin(1)]).mean())


def check_scene(name: str, encoder: torch.nn.Module, seed: int = 0) -> dict[str, float]:
    """Train the scene's TinyNeRF (FULL sizes), collect its training views' deltas, score each candidate f."""
    from ocd_hf import OCDTrainer, OCDTrainingArguments, OCDWrapper

    sizes = tn.FULL
    train = tn.scene_dataset(tn.SCENES[name], tn.view_poses(seed, sizes)["train"], sizes.image)
    model = tn.train_base(train, sizes, seed)
    ocd = OCDWrapper.from_pretrained(model, layer="layer1", loss="mse", task="regression", **tn.OVERFIT)
    args = OCDTrainingArguments(collect_batch_size=8, progress=False)
    with tempfile.TemporaryDirectory() as d:
        delta = OCDTrainer(ocd, args, loss="mse").collect(train, d).column("delta").flatten(1)
    with torch.no_grad():
        base = model(train.tensors[0])
        x = base.reshape(-1, sizes.image, sizes.image, 3).permute(0, 3, 1, 2).clamp(0, 1)
        x = torch.nn.functional.interpolate(x, size=sizes.encode_size, mode="bilinear", align_corners=False)
        feats = encoder.forward_features((x * 255 - 127) / 128)
        candidates = {
            "features (1280)": encoder.forward_head(feats, pre_logits=True),
            "logits (1000)": encoder.forward_head(feats),
            "mean colour (3)": base.mean(1),
        }
    return {k: round(nearest_delta_cosine(f, delta), 4) for k, f in candidates.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(tn.DEFAULT_DATA))
    p.add_argument("--scenes", nargs="+", default=list(tn.SCENES), choices=list(tn.SCENES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    encoder, why = tn.find_encoder(args.data_root)
    if encoder is None:
        raise SystemExit(f"Needs the encoder: {why}")
    for name in args.scenes:
        t0 = time.perf_counter()
        result = check_scene(name, encoder, args.seed)
        print(json.dumps({"scene": name, "seed": args.seed, "nearest_delta_cosine": result}), flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

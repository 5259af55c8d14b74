"""OCD for speech separation: per-mixture weights for a Conv-TasNet-style separator, scored in SI-SDRi.

    python examples/speech_separation_ocd.py --quick          # seconds, toy sizes
    python examples/speech_separation_ocd.py                  # full size, minutes (one seed)
    python examples/speech_separation_ocd.py --num-sources 2  # another number of sources

The mixtures are SYNTHETIC stand-ins for Libri5Mix (harmonic "voices" with gliding pitch, drifting
formants, syllable-like bursts and noise bursts; no speech corpus is reachable offline): see
docs/examples/speech.md. The data, the model, SI-SDR / PIT and the scoring live in
benchmarks/task_speech.py (run from a checkout of the project), which `make bench` runs for 2, 3, 4 and 5
sources x 3 seeds.

Steps: synthesise train / validation / test mixtures, train the separator with permutation-invariant
SI-SDR, fit OCD on the last block's 1x1 output projection (one sample = one mixture, loss = minus its
PIT SI-SDR), choose delta_scale on the validation mixtures and print every row on the test mixtures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside examples/


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: runs in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-sources", type=int, default=None, help="sources per mixture (default 5; 3 with --quick)")
    p.add_argument("--overfit-lr", type=float, default=None, help="OCD's per-sample learning rate (default 5e-3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)

    from benchmarks.task_speech import FULL, QUICK, run_seed

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.num_sources is not None:
        if not 2 <= args.num_sources <= 6:
            p.error(f"--num-sources {args.num_sources}: use 2 to 6 (PIT tries every permutation).")
        sizes = dataclasses.replace(sizes, num_sources=args.num_sources)
    if args.overfit_lr is not None:
        sizes = dataclasses.replace(sizes, overfit_lr=args.overfit_lr)
    t0 = time.perf_counter()
    r = run_seed(args.seed, quick=args.quick, sizes=sizes, progress=not args.quick)
    s = r["sizes"]
    print(
        f"\n{s['num_sources']}-source synthetic mixtures ({s['seconds']} s at {s['sample_rate']} Hz): "
        f"{s['n_train']} train / {s['n_val']} validation / {s['n_test']} test; separator of "
        f"{s['model_parameters']:,} parameters; OCD on {s['layer']} {tuple(s['layer_weight'])}; "
        f"delta_scale {r['delta_scale']:g} (0: no gain on validation, OCD is off)\n"
    )
    print("| row | SI-SDRi (dB) | SI-SDR (dB) |\n|---|---|---|")
    for label, m in r["rows"].items():
        print(f"| {label} | {m['si_sdri']:.2f} | {m['si_sdr']:.2f} |")
    print(f"\ncosine of the deltas to the oracle's: {r['cosine_to_oracle']}")
    t = r["times_s"]
    print(
        f"total {time.perf_counter() - t0:.1f}s (data {t['data']:.1f}s, base model {t['base']:.1f}s, "
        f"OCD fit {t['ocd_fit']:.1f}s, scoring {t['score']:.1f}s)"
    )


if __name__ == "__main__":
    main()

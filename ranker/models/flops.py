"""The size ladder's cost table: parameters and forward FLOPs per request of every family
at every size (`python -m ranker.models.flops`; docs/astro.md quotes it)."""

from __future__ import annotations

from ranker.models import FAMILIES, build_model
from ranker.models.config import SIZE_NAMES


def main() -> None:
    n, M, catalogue = 256, 32, 50_000
    print(f"n={n} M={M} n_tracks={catalogue}")
    print(f"{'family':8} {'size':4} {'params':>12} {'non-emb':>12} {'MFLOPs/request':>15}")
    for family in FAMILIES:
        for size in SIZE_NAMES:
            model = build_model(family, size, catalogue)
            mflops = model.flops_per_request(n, M) / 1e6
            print(f"{family:8} {size:4} {model.n_params():>12,} {model.n_params(False):>12,} {mflops:>15.1f}")


if __name__ == "__main__":
    main()

"""Draw docs/figures/block_layout.png: the Jigsaw block layout on a DOMAIN=2 x TP=2 model group.

    python docs/figures/make_block_layout.py [--out PATH]

The shapes are those of the WeatherMixer self-check's default model
(`weathermixer.selfcheck.default_model_config`:
25 x 24 grid, 2 x 3 patches zero-padded to 13 x 8 = 104 tokens, D = 32, channel-mixing hidden
H_c = 48), split the way `weathermixer.grid` and `jigsaw_ext.layers.BlockLinear` split them:

(a) an activation (tokens x features): 13 patch rows -> 7 + 6 latitude bands over DOMAIN
    (56 + 48 tokens), 32 features -> 16 + 16 over TP;
(b) the channel-mixing weight A1 (H_c x D = 48 x 32): columns split like the contracted feature
    axis (over TP), rows over the other model axis (DOMAIN); rank (d, t) stores block (d, t) and,
    when the layer runs, gathers the rest of column strip t from its DOMAIN partner.

Rank = domain * TP + tp (TP fastest). Deterministic: Agg backend, no timestamps in the PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

DOMAIN, TP = 2, 2
PATCH_ROWS, PATCH_COLS = (7, 6), 8  # 13 patch rows over DOMAIN (even_split: the first band gets one more)
TOKENS = tuple(r * PATCH_COLS for r in PATCH_ROWS)  # (56, 48)
FEATURES = (16, 16)  # D = 32 over TP
HIDDEN_ROWS = (24, 24)  # H_c = 48 rows of A1, stored over DOMAIN
COLORS = ("#8dd3c7", "#fdb462", "#bebada", "#fb8072")  # one per rank, the same in both panels


def rank(d: int, t: int) -> int:
    return d * TP + t


def offsets(sizes):
    out, o = [], 0
    for s in sizes:
        out.append(o)
        o += s
    return out


def draw_activation(ax):
    """(a) tokens (rows, north at the top) x features (columns)."""
    n_tok, n_feat = sum(TOKENS), sum(FEATURES)
    for d, (t0, nt) in enumerate(zip(offsets(TOKENS), TOKENS, strict=True)):
        for t, (f0, nf) in enumerate(zip(offsets(FEATURES), FEATURES, strict=True)):
            r = rank(d, t)
            ax.add_patch(Rectangle((f0, t0), nf, nt, facecolor=COLORS[r], edgecolor="black", lw=1.5))
            ax.text(
                f0 + nf / 2,
                t0 + nt / 2,
                f"rank {r}\n(domain {d}, tp {t})\n{nt} tokens\nx {nf} features",
                ha="center",
                va="center",
                fontsize=9.5,
            )
    # patch-row boundaries: each patch row is PATCH_COLS consecutive tokens
    for k in range(1, sum(PATCH_ROWS)):
        ax.axhline(k * PATCH_COLS, color="black", lw=0.4, alpha=0.35)
    for d, (t0, nt) in enumerate(zip(offsets(TOKENS), TOKENS, strict=True)):
        first = sum(PATCH_ROWS[:d])
        ax.annotate(
            f"DOMAIN {d}:\npatch rows\n{first}-{first + PATCH_ROWS[d] - 1}\n({PATCH_ROWS[d]} x {PATCH_COLS}\n"
            f"= {nt} tokens)",
            xy=(0, t0 + nt / 2),
            xytext=(-3, t0 + nt / 2),
            ha="right",
            va="center",
            fontsize=9,
            annotation_clip=False,
        )
    for t, (f0, nf) in enumerate(zip(offsets(FEATURES), FEATURES, strict=True)):
        ax.text(f0 + nf / 2, -1.5, f"TP {t}\nfeatures {f0}-{f0 + nf - 1}", ha="center", va="bottom", fontsize=9)
    ax.text(n_feat + 1, 2, "north", fontsize=8.5, va="center")
    ax.text(n_feat + 1, n_tok - 2, "south", fontsize=8.5, va="center")
    ax.set_xlim(0, n_feat)
    ax.set_ylim(n_tok, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"features (D = {n_feat}), split over TP", fontsize=10)
    ax.set_title(
        "(a) activation x: tokens x features\n"
        f"13 patch rows -> {PATCH_ROWS[0]} + {PATCH_ROWS[1]} over DOMAIN, "
        f"{n_feat} features -> {FEATURES[0]} + {FEATURES[1]} over TP",
        fontsize=10.5,
        pad=36,
    )


def draw_weight(ax):
    """(b) A1 (features_out x features_in) as a grid of blocks; rank 0's gathered block hatched."""
    n_out, n_in = sum(HIDDEN_ROWS), sum(FEATURES)
    for d, (r0, nr) in enumerate(zip(offsets(HIDDEN_ROWS), HIDDEN_ROWS, strict=True)):
        for t, (c0, nc) in enumerate(zip(offsets(FEATURES), FEATURES, strict=True)):
            r = rank(d, t)
            ax.add_patch(Rectangle((c0, r0), nc, nr, facecolor=COLORS[r], edgecolor="black", lw=1.5))
            ax.text(
                c0 + nc / 2,
                r0 + nr / 2,
                f"stored by\nrank {r}\n({nr} x {nc})" + ("\n\ngathered\nby rank 0" if r == 2 else ""),
                ha="center",
                va="center",
                fontsize=9.5,
            )
    # column strip tp=0 is what ranks 0 and 2 multiply by; rank 0 gathers the block rank 2 stores
    ax.add_patch(
        Rectangle(
            (FEATURES[0] * 0.04, HIDDEN_ROWS[0] + 0.8),
            FEATURES[0] * 0.92,
            HIDDEN_ROWS[1] - 1.6,
            facecolor="none",
            edgecolor="black",
            hatch="//",
            lw=0,
            alpha=0.45,
        )
    )
    ax.add_patch(
        Rectangle(
            (-0.6, -0.6),
            FEATURES[0] + 1.2,
            n_out + 1.2,
            facecolor="none",
            edgecolor="#1f4e9c",
            lw=2.5,
            ls="--",
            clip_on=False,
        )
    )
    for t, (c0, nc) in enumerate(zip(offsets(FEATURES), FEATURES, strict=True)):
        ax.text(c0 + nc / 2, n_out + 1.5, f"TP {t}\nin {c0}-{c0 + nc - 1}", ha="center", va="top", fontsize=9)
    for d, (r0, nr) in enumerate(zip(offsets(HIDDEN_ROWS), HIDDEN_ROWS, strict=True)):
        ax.text(-1.5, r0 + nr / 2, f"DOMAIN {d}:\nout-rows\n{r0}-{r0 + nr - 1}", ha="right", va="center", fontsize=9)
    ax.text(
        n_in + 1.5,
        n_out / 2,
        "rank 0 uses column strip TP 0\n(dashed): its own block plus the\n"
        "hatched block, all-gathered from\nrank 2 (same tp, other domain)\n"
        "while it multiplies its own block.\n\n"
        "x[band 0, feat 0-15] @ strip^T\n= partial sums of all 48 outputs\nfor its 56 tokens;\n"
        "reduce-scatter over TP {0, 1}\n-> rank 0 keeps outputs 0-23.\n\n"
        "Likewise rank 1 uses strip TP 1\n(own block + rank 3's).\n"
        "The gathered rows are freed\nafter use and re-gathered in\nbackward; dL/dA is reduce-\n"
        "scattered back to the owners.",
        ha="left",
        va="center",
        fontsize=9,
        bbox=dict(boxstyle="round", facecolor="white", edgecolor="#1f4e9c"),
    )
    ax.set_xlim(0, n_in)
    ax.set_ylim(n_out, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"in-features (D = {n_in}, the contracted axis)", fontsize=10, labelpad=30)
    ax.set_title(
        f"(b) channel-mixing weight A1: {n_out} x {n_in}\n"
        "columns split like the contracted axis (TP),\nrows over the other model axis (DOMAIN)",
        fontsize=10.5,
    )


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("block_layout.png"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.family": "DejaVu Sans", "hatch.linewidth": 1.0, "svg.hashsalt": "jigsaw"})
    fig = plt.figure(figsize=(13.5, 6.6))
    ax_a = fig.add_axes([0.115, 0.06, 0.25, 0.74])
    ax_b = fig.add_axes([0.52, 0.22, 0.19, 0.55])
    draw_activation(ax_a)
    draw_weight(ax_b)
    fig.text(
        0.5,
        0.985,
        "Jigsaw block layout on one model group, DOMAIN = 2 x TP = 2 (rank = domain x 2 + tp: TP fastest)",
        ha="center",
        va="top",
        fontsize=12,
        weight="bold",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return args.out


if __name__ == "__main__":
    main()

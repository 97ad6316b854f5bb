"""python -m weathermixer.model.skip_fit --config JOB [--set KEY=VALUE] --leads L [--ridge R1,R2,..] --out FIT.npz

The per-pixel linear skip head's initial coefficients (model.pixel_skip_init): for each lead, channel and
pixel, the least-squares fit of y(t + l dt) - x(t) on the head's features (weathermixer.model.skip: the
regression baseline's with pixel_skip_inputs "all", the anchor's with "anchor") over the job's training
split, in the model's normalised units: the regression baseline of weathermixer.evaluation.baselines fitted
the way the model sees the data. Only samples whose every target lies inside the training split are used,
per lead (as the baseline does). The features are computed by the head itself (PixelSkip.features), so the
fit and the model cannot disagree on them.

Ridge: a multiple of each pixel's mean diagonal of the normal matrix added to its diagonal; it shrinks the
coefficients towards 0, i.e. towards persistence (the target is the change y - x(t)). With several values
(--ridge 1e-4,1e-2,1), each is fitted on the training split and scored on the job's validation split
(the latitude-weighted MSE of each lead 1..L, normalised units, every validation sample); the one with the
smallest mean over the leads is written, and the table printed and stored (val_mse, ridges).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from jigsaw_ext.files import make_output_folders

from .skip import FEATURE_NAMES, PixelSkip, skip_feature_names, skip_features, skip_time_features


def _loader(data_cfg, model_cfg, leads: int, split: str):
    from jigsaw_ext.mesh import Mesh

    from ..data.loader import ShardedSampleLoader

    return ShardedSampleLoader(
        data_cfg.model_copy(update={"leads": leads}),
        model_cfg,
        Mesh.single(),
        split,
        batch=1,
        shuffle=False,
        infinite=False,
    )


def _design(head: PixelSkip, s, lead: int):
    """(b, C, H, W, F) features of lead `lead` (float64), and the states (t - h dt .. t)."""
    x = s.fields.double()
    states = list(x.unbind(1)) if head.geo.cfg.history else [x]
    static = None if s.static is None else s.static.double()
    feats = head.features(states, static, lead)
    X = torch.stack([f.expand_as(states[-1]) for f in feats], -1)
    return X.numpy(), states[-1].numpy()


@torch.no_grad()
def fit(data_cfg, model_cfg, leads: int, batch: int = 64, ridge: float | list[float] = 1e-6, progress=print):
    """Per lead, channel and pixel: the least-squares coefficients of y(t + l dt) - x(t) on the skip
    features over every training sample of the job (the regression baseline, in the model's normalised
    units). ridge: added to the diagonal, relative to the mean diagonal of each pixel's normal matrix; a
    list: each scored on the validation split, the best (smallest mean MSE over leads) returned.
    Returns (coef (lead, F, C, H, W), time-feature names, training samples, info dict)."""
    from jigsaw_ext.mesh import Mesh

    from ..grid import Geometry

    model_cfg = model_cfg.model_copy(update={"pixel_skip": leads, "pixel_skip_init": None})
    head = PixelSkip(Geometry(model_cfg, Mesh.single()))
    loader = _loader(data_cfg, model_cfg, leads, "train")
    tidx = skip_time_features(model_cfg)
    C, (H, W), F = model_cfg.channels.n_fields, model_cfg.grid, skip_features(model_cfg)
    A = np.zeros((leads, C, H, W, F, F))
    B = np.zeros((leads, C, H, W, F))
    yy, counts = np.zeros((leads, C, H, W)), np.zeros(leads)
    # lead l: every sample whose target t + l dt lies inside the training split (the trainer's samples
    # only start there), as the regression baseline does: no fitted value comes from the validation days
    end = pd.Timestamp(data_cfg.splits["train"][1])
    k, times = loader.data.k, loader.data.times
    ids = [i for i, t in enumerate(loader.starts) if times[int(t) + k] <= end]
    n = len(ids)
    for b0 in range(0, n, batch):
        chunk = ids[b0 : b0 + batch]
        s = loader.load_batch(chunk)
        for lead, y in enumerate(s.targets):
            X, x = _design(head, s, lead + 1)
            ok = np.array([times[int(loader.starts[i]) + (lead + 1) * k] <= end for i in chunk])
            A[lead] += np.einsum("bchwp,bchwq->chwpq", X[ok], X[ok])
            r = y.double().numpy()[ok] - x[ok]
            B[lead] += np.einsum("bchwp,bchw->chwp", X[ok], r)
            yy[lead] += (r**2).sum(0)
            counts[lead] += ok.sum()
        progress(f"fit: {min(n, b0 + batch)}/{n} samples")
    diag = np.einsum("...ii->...", A)[..., None, None] / F
    ridges = [ridge] if np.isscalar(ridge) else list(ridge)
    coefs = [np.linalg.solve(A + r * diag * np.eye(F), B[..., None])[..., 0] for r in ridges]  # (lead, C, H, W, F)
    info = {"ridges": ridges, "ridge": ridges[0], "val_mse": None}
    if len(ridges) > 1:
        info["val_mse"] = mse = _validation_mse(head, data_cfg, model_cfg, leads, coefs, batch)
        info["ridge"] = ridges[int(np.argmin(mse.mean(1)))]
    coef = coefs[ridges.index(info["ridge"])]
    # the training split's MSE of the chosen fit per lead (normalised units, every pixel alike): |r|^2 - 2 w.B + w.A.w
    sse = yy - 2 * np.einsum("lchwp,lchwp->lchw", coef, B) + np.einsum("lchwp,lchwpq,lchwq->lchw", coef, A, coef)
    info["train_mse"] = sse.mean(axis=(1, 2, 3)) / counts
    return coef.transpose(0, 4, 1, 2, 3), [model_cfg.channels.static[i] for i in tidx], n, info


def _validation_mse(head, data_cfg, model_cfg, leads: int, coefs, batch: int) -> np.ndarray:
    """(ridge, lead) latitude-weighted MSE (normalised units) of each fit on every validation sample."""
    loader = _loader(data_cfg, model_cfg, leads, "val")
    from ..latitudes import latitude_weights

    w = latitude_weights(loader.lat)[:, None]  # the loss's and evaluate's cell-area weights
    sums, count = np.zeros((len(coefs), leads)), 0
    for b0 in range(0, len(loader.starts), batch):
        s = loader.load_batch(range(b0, min(len(loader.starts), b0 + batch)))
        for lead, y in enumerate(s.targets):
            X, x = _design(head, s, lead + 1)
            for r, c in enumerate(coefs):
                pred = x + np.einsum("bchwp,chwp->bchw", X, c[lead])
                sums[r, lead] += (((pred - y.double().numpy()) ** 2) * w).mean(axis=(1, 2, 3)).sum()
        count += len(s.times)
    return sums / count


def main(argv=None) -> int:
    """python -m weathermixer.model.skip_fit --config JOB [--set KEY=VALUE] --leads L --out FIT.npz"""
    import argparse

    from ..data import load_data_job

    ap = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m weathermixer.model.skip_fit",
        description="fit the per-pixel linear skip head by least squares on the job's "
        "training split (model.pixel_skip_init)",
    )
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE")
    ap.add_argument("--data", help="data set path (overrides data.path)")
    ap.add_argument("--leads", type=int, required=True, help="leads 1..L (model.pixel_skip)")
    ap.add_argument(
        "--ridge",
        default="1e-6",
        help="ridge, relative to each pixel's mean diagonal; a comma-separated list: chosen on the validation split",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    make_output_folders(ap, {"--out": args.out})
    job = load_data_job(args.config, args.set, args.data)
    ridges = [float(r) for r in args.ridge.split(",")]
    coef, statics, n, info = fit(
        job.data, job.model, args.leads, ridge=ridges if len(ridges) > 1 else ridges[0], progress=lambda m: None
    )
    mse = info["val_mse"]
    print("training MSE (normalised units) by lead: " + " ".join(f"{v:.4f}" for v in info["train_mse"]))
    if mse is not None:
        print("validation MSE (normalised units) by lead 1.." + str(args.leads) + ", mean:")
        for r, row in zip(info["ridges"], mse, strict=True):
            print(
                f"  ridge {r:g}: "
                + " ".join(f"{v:.4f}" for v in row)
                + f" | {row.mean():.4f}"
                + ("  <- chosen" if r == info["ridge"] else "")
            )
    cfg = job.model.model_copy(update={"pixel_skip": args.leads})
    np.savez(
        args.out,
        coef=coef.astype(np.float32),
        static=np.array(statics, dtype=str),
        history=job.model.history,
        samples=n,
        inputs=job.model.pixel_skip_inputs,
        day=job.model.pixel_skip_day,
        features=np.array(skip_feature_names(cfg), dtype=str),
        ridge=info["ridge"],
        ridges=np.array(info["ridges"]),
        train_mse=info["train_mse"],
        val_mse=np.array([] if mse is None else mse),
    )
    print(
        f"wrote {args.out}: coefficients {coef.shape} (lead, {FEATURE_NAMES}, channel, lat, lon) from {n} "
        f"training samples, ridge {info['ridge']:g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

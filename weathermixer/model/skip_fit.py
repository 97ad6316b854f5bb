"""python -m weathermixer.model.skip_fit --config JOB [--set KEY=VALUE] --leads L --out FIT.npz

The per-pixel linear skip head's initial coefficients (model.pixel_skip_init): for each lead, channel and
pixel, the least-squares fit of y(t + l dt) - x(t) on the head's features (weathermixer.model.skip) over
the job's training split, in the model's normalised units: the regression baseline of
weathermixer.evaluation.baselines fitted the way the model sees the data. Only samples whose every
target lies inside the training split are used, per lead (as the baseline does).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .skip import FEATURE_NAMES, skip_features, skip_time_features


@torch.no_grad()
def fit(data_cfg, model_cfg, leads: int, batch: int = 64, ridge: float = 1e-6, progress=print):
    """Per lead, channel and pixel: the least-squares coefficients of y(t + l dt) - x(t) on the skip
    features over every training sample of the job (the regression baseline, in the model's normalised
    units). ridge: added to the diagonal, relative to the mean diagonal of each pixel's normal matrix."""
    from jigsaw_ext.mesh import Mesh

    from ..data.loader import ShardedSampleLoader

    model_cfg = model_cfg.model_copy(update={"pixel_skip": leads})
    loader = ShardedSampleLoader(data_cfg.model_copy(update={"leads": leads}), model_cfg, Mesh.single(), "train",
                                 batch=1, shuffle=False, infinite=False)
    tidx = skip_time_features(model_cfg)
    C, (H, W), F = model_cfg.channels.n_fields, model_cfg.grid, skip_features(model_cfg)
    A = np.zeros((leads, C, H, W, F, F))
    B = np.zeros((leads, C, H, W, F))
    # lead l: every sample whose target t + l dt lies inside the training split (the trainer's samples
    # only start there), as the regression baseline does: no fitted value comes from the validation days
    end = pd.Timestamp(data_cfg.splits["train"][1])
    k, times = loader.data.k, loader.data.times
    ids = [i for i, t in enumerate(loader.starts) if times[int(t) + k] <= end]
    n = len(ids)
    for b0 in range(0, n, batch):
        chunk = ids[b0:b0 + batch]
        s = loader.load_batch(chunk)
        x = s.fields.double().numpy()
        states = [x[:, j] for j in range(x.shape[1])] if model_cfg.history else [x]
        ones = np.ones_like(states[-1])
        hours = [np.broadcast_to(s.static[:, i:i + 1].double().numpy(), ones.shape) for i in tidx]
        constant = [ones] if model_cfg.pixel_skip_inputs == "all" else []
        X = np.stack(states + hours + constant, axis=-1)  # (b, C, H, W, F)
        for lead, y in enumerate(s.targets):
            ok = np.array([times[int(loader.starts[i]) + (lead + 1) * k] <= end for i in chunk])
            A[lead] += np.einsum("bchwp,bchwq->chwpq", X[ok], X[ok])
            B[lead] += np.einsum("bchwp,bchw->chwp", X[ok], y.double().numpy()[ok] - states[-1][ok])
        progress(f"fit: {min(n, b0 + batch)}/{n} samples")
    diag = np.einsum("...ii->...", A)[..., None, None] / F
    coef = np.linalg.solve(A + ridge * diag * np.eye(F), B[..., None])[..., 0]  # (lead, C, H, W, F)
    return coef.transpose(0, 4, 1, 2, 3), [model_cfg.channels.static[i] for i in tidx], n


def main(argv=None) -> int:
    """python -m weathermixer.model.skip --config JOB [--set KEY=VALUE] --leads L --out FIT.npz"""
    import argparse

    from ..data.__main__ import _job

    ap = argparse.ArgumentParser(prog="python -m weathermixer.model.skip_fit",
                                 description="fit the per-pixel linear skip head by least squares on the job's "
                                             "training split (model.pixel_skip_init)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE")
    ap.add_argument("--data", help="data set path (overrides data.path)")
    ap.add_argument("--leads", type=int, required=True, help="leads 1..L (model.pixel_skip)")
    ap.add_argument("--ridge", type=float, default=1e-6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    job = _job(args)
    coef, statics, n = fit(job.data, job.model, args.leads, ridge=args.ridge, progress=lambda m: None)
    np.savez(args.out, coef=coef.astype(np.float32), static=np.array(statics, dtype=str),
             history=job.model.history, samples=n)
    print(f"wrote {args.out}: coefficients {coef.shape} (lead, {FEATURE_NAMES}, channel, lat, lon) from {n} "
          f"training samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

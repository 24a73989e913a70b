"""``surface``: 1-D/2-D loss grids along random directions with filter/layer/weight normalization
(biases fixed; Li et al. 2018), top Hessian eigenvectors, or the PCA of the job's checkpoint
series (:func:`probe.surface.surface`)."""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from cluster.kinds.base import (
    F64,
    LIST,
    Headline,
    Kind,
    Sizes,
    Working,
    floats,
    is_int,
    is_num,
    num,
    single_lanczos,
    vec,
)
from cluster.runners import ProbeContext, finite_or_none
from probe.directions import Directions, pca_directions, random_directions
from probe.eigen import eigenvalues
from probe.surface import SurfaceResult, surface

OPTIONS = {
    "dims": 2,
    "resolution": 51,  # Li et al. 2018
    "span": 1.0,  # Li et al. 2018
    "normalization": None,  # filter for random directions; none for eigen/pca (unit vectors)
    "directions": "random",  # random | eigen | pca (pca: over the job's checkpoint series)
    "ignore_1d": True,  # biases and norm parameters fixed (Li et al. 2018, Sec. 4)
}

CHECKS = {
    "dims": (lambda v: v in (1, 2), "1 or 2"),
    "resolution": (lambda v: is_int(v) and v >= 2, "an integer of at least 2"),
    "span": (lambda v: is_num(v) and v > 0, "a positive number"),
    "normalization": (
        lambda v: v in (None, "filter", "layer", "weight", "none"),
        "'filter', 'layer', 'weight', 'none' or null",
    ),
    "directions": (lambda v: v in ("random", "eigen", "pca"), "'random', 'eigen' or 'pca'"),
    "ignore_1d": (lambda v: isinstance(v, bool), "true or false"),
}

COLUMNS = (
    pa.field("dims", pa.int32()),
    pa.field("normalization", pa.string()),
    pa.field("directions", pa.string()),
    pa.field("ignore_1d", pa.bool_()),
    pa.field("alpha", LIST),
    pa.field("beta", LIST),  # empty for 1-D
    pa.field("loss", LIST),  # row-major over (alpha, beta)
    pa.field("error", LIST),
    pa.field("num_evaluations", pa.int64()),
    pa.field("num_nonfinite", pa.int64()),
    pa.field("direction_norms", LIST),
    pa.field("direction_cosine", F64),
    pa.field("eigenvalues", LIST),
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """The loss and error on a 1-D or 2-D grid around the checkpoint along random, eigen or PCA
    directions."""
    ev = ctx.evaluator()
    center = ev.center()
    grid = torch.linspace(-o["span"], o["span"], o["resolution"], dtype=torch.float64)
    k = o["dims"]
    matvecs = 0
    if o["directions"] == "random":
        dirs = random_directions(
            ev.space, center, k, g, normalization=o["normalization"] or "filter", ignore_1d=o["ignore_1d"]
        )
    elif o["directions"] == "eigen":
        op = ctx.operator()
        r = eigenvalues(op, k, which="largest", generator=g, return_eigenvectors=True)
        vectors = r.eigenvectors
        assert vectors is not None  # return_eigenvectors=True: probe.eigen always forms them
        if hasattr(op, "gather"):  # sharded: whole vectors are needed to move through parameter space
            vectors = op.gather(vectors)
        matvecs = r.num_matvecs
        dirs = Directions(
            vectors=vectors.T.contiguous().to(center.dtype),
            kind="eigen",
            normalization="none",
            ignore_1d=False,
            eigenvalues=r.eigenvalues.cpu(),
            note=r.note,
        )
    else:
        trajectory = [ev.space.get_flat(ctx.load(c)) for c in o["series"]]
        dirs = pca_directions(trajectory, center, k)
    betas = grid if k == 2 else None
    r = surface(ev, center, dirs, grid, betas)
    return {
        "dims": k,
        "normalization": r.normalization,
        "directions": r.directions,
        "ignore_1d": r.ignore_1d,
        "mode": r.mode,
        "alpha": list(r.alphas),
        "beta": list(r.betas),
        "loss": r.loss_flat,
        "error": [None if math.isnan(e) else e for e in r.error_flat],
        "num_evaluations": r.num_evaluations,
        "num_nonfinite": r.num_nonfinite,
        "direction_norms": list(r.direction_norms),
        "direction_cosine": finite_or_none(r.direction_cosine),
        "eigenvalues": [float(x) for x in r.eigenvalues],
        "num_matvecs": matvecs,
        "note": r.note,
    }


def vectors(o: dict, s: Sizes) -> Working:
    """One Lanczos run at the default step cap (:func:`cluster.kinds.base.single_lanczos`): what eigen
    directions take, counted for every direction kind."""
    return single_lanczos(s)


def series(o: dict) -> bool:
    """PCA directions are those of the checkpoint trajectory: the task reads the whole series."""
    return o["directions"] == "pca"


def surface_from_row(row: dict) -> SurfaceResult:
    """The surface of a ``surface`` row (the loss list is stored alpha-major)."""
    alphas, betas = tuple(floats(row["alpha"])), tuple(floats(row.get("beta")))
    shape = (len(alphas), len(betas)) if betas else (len(alphas),)
    loss = vec(row["loss"]).reshape(shape)
    return SurfaceResult(
        directions=str(row.get("directions") or "random"),
        normalization=str(row.get("normalization") or "none"),
        ignore_1d=bool(row.get("ignore_1d")),
        mode=str(row.get("mode") or ""),
        alphas=alphas,
        betas=betas,
        loss=loss,
        error=vec(row.get("error") or [None] * loss.numel()).reshape(shape),
        num_evaluations=int(row.get("num_evaluations") or 0),
        num_nonfinite=int(row.get("num_nonfinite") or 0),
        direction_norms=tuple(floats(row.get("direction_norms"))),
        direction_cosine=num(row.get("direction_cosine")),
        eigenvalues=tuple(floats(row.get("eigenvalues"))),
        note=str(row.get("note") or ""),
    )


KIND = Kind(
    name="surface",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    read=surface_from_row,
    series=series,
    # losses on the grid report their NaNs in num_nonfinite: nothing must be finite
    headline=Headline(finite=()),
)

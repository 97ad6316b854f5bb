"""How a BlockMLP meets its data on a mesh: the communication and memory each strategy costs, and the
choice `auto` makes from them (mesh.strategy). Pure arithmetic on sizes: the planner prices the
same strategies with these functions."""

from __future__ import annotations

from .mesh import STRATEGIES, Mesh


def other_axis(axis: str) -> str:
    return {"domain": "tp", "tp": "domain"}[axis]


def mlp_traffic(
    strategy: str, rows: int, features: int, hidden: int, storage: int, contract: int, replicate: bool = False
) -> float:
    """Elements one rank sends (ring volumes, as jigsaw_ext.commstats counts them) in one forward +
    backward of a BlockMLP on `rows` rows (micro-batch x rows per sample) of `features` features,
    hidden size `hidden`, storage / contract axes of these sizes (its LayerNorm: `norm_traffic`).

    gather:     per weight matrix (hidden x features / contract): all-gather over storage forward and
                again backward, reduce-scatter of its gradient (all-reduce with replicate=True);
                activations: reduce-scatter over contract of each product, all-gather backward.
    stationary: all-gather of the rows over storage, all-reduce over contract of the hidden partial
                sums, reduce-scatter over storage of the output; the same three backward.
    features:   all-gather of the features over contract, reduce-scatter of the output; the same two
                backward (weights replicated over storage, if it has ranks: their gradients all-reduced)."""
    s, c, R, D, H = storage, contract, rows, features, hidden
    fs, fc = (s - 1) / s, (c - 1) / c
    if strategy == "gather":
        weights = 2 * (2 * fs * H * D / c) if replicate else 2 * 3 * fs * H * D / c
        return weights + 2 * fc * R * H / s + 2 * fc * R * D / s
    if strategy == "stationary":
        return 4 * fs * R * D / c + 4 * fc * R * H / s
    if strategy == "features":
        return 4 * fc * R * D / s + 2 * (2 * fs * H * D / c)
    raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")


def norm_traffic(vectors: float, group_size: int) -> float:
    """Elements one rank sends for a split LayerNorm of `vectors` vectors over a group of this size:
    the all-gather of each rank's (mean, M2) forward, the all-reduce of two sums backward."""
    g = group_size
    return 2 * (g - 1) * vectors + 2 * (g - 1) / g * 2 * vectors


def fuses_norm(strategy: str, norm: str | None, split: bool) -> bool:
    """Whether the strategy gathers the whole axis its LayerNorm normalises ('rows' or 'features'), so
    that the LayerNorm is computed locally with no statistics exchanged (only worth it when that axis
    is `split`: otherwise the block's own LayerNorm is already local and runs the fused kernel)."""
    return split and (strategy, norm) in (("stationary", "rows"), ("features", "features"))


def mlp_saved(
    strategy: str, rows: int, features: int, hidden: int, storage: int, contract: int, fused: bool = False
) -> float:
    """Elements one rank saves for backward in a BlockMLP and its LayerNorm: the LayerNorm's input,
    fc1's input and the hidden activation before and after GELU, in the layout the strategy has them
    (fused: the LayerNorm saves the gathered input instead of this rank's block)."""
    s, c, R, D, H = storage, contract, rows, features, hidden
    own = R * D / (s * c)
    if strategy == "gather":
        return 2 * own + 2 * R * H / (s * c)
    if strategy == "stationary":
        return (R * D / c if fused else own) + R * D / c + 2 * R * H / s
    return (R * D / s if fused else own) + R * D / s + 2 * R * H / (s * c)


def mlp_extra_memory(
    strategy: str, rows: int, features: int, hidden: int, storage: int, contract: int, fused: bool = False
) -> float:
    """Elements saved for backward beyond the gather strategy's (which keeps only this rank's blocks)."""
    shape = (rows, features, hidden, storage, contract)
    return mlp_saved(strategy, *shape, fused) - mlp_saved("gather", *shape)


def strategy_available(mesh: Mesh, strategy: str, contract: str) -> bool:
    """'features' keeps whole weight rows (hidden / contract x features) on every rank of the storage
    axis: only where that axis has one rank or the job replicates weights over it."""
    storage = other_axis(contract)
    return strategy != "features" or mesh.size(storage) == 1 or storage in mesh.replicate_weights_over


def choose_strategy(
    mesh: Mesh, kind: str, rows: int, features: int, hidden: int, contract: str, norm: str | None = None, batch: int = 1
) -> str:
    """The job's strategy for this layer kind (mesh.strategy; key '*': every kind not listed, where
    that strategy is available), or with 'auto' the one that sends the fewest bytes (`mlp_traffic`
    plus its LayerNorm's statistics unless it fuses the LayerNorm; ties keep the weights gathered:
    the fully sharded layout) among those available whose extra activation memory fits
    mesh.strategy_memory_mb. norm: the axis the MLP's LayerNorm normalises ('rows' or 'features')."""
    storage = other_axis(contract)
    requested = mesh.strategy.get(kind)
    if requested is not None and not strategy_available(mesh, requested, contract):
        raise ValueError(
            f"mesh.strategy: {kind}={requested} needs mesh.{storage}=1 or '{storage}' in "
            f"mesh.replicate_weights_over (mesh: domain={mesh.size('domain')}, tp={mesh.size('tp')})"
        )
    requested = requested or mesh.strategy.get("*", "auto")
    if requested != "auto" and strategy_available(mesh, requested, contract):
        return requested
    s, c = mesh.size(storage), mesh.size(contract)
    shape = dict(rows=rows, features=features, hidden=hidden, storage=s, contract=c)
    replicate = storage in mesh.replicate_weights_over
    # the LayerNorm's statistics, when not fused: over `storage` for the rows (vectors: the batch's
    # columns this rank holds), over `contract` for the features (vectors: this rank's rows)
    vectors, group = (batch * features / c, s) if norm == "rows" else (rows / s, c)
    costs = {}
    for name in STRATEGIES:
        if not strategy_available(mesh, name, contract):
            continue
        fused = fuses_norm(name, norm, group > 1)
        extra = mlp_extra_memory(name, **shape, fused=fused)
        if name != "gather" and mesh.strategy_memory_mb is not None and extra * 4 > mesh.strategy_memory_mb * 2**20:
            continue
        costs[name] = mlp_traffic(name, replicate=replicate, **shape) + (
            0.0 if norm is None or fused else norm_traffic(vectors, group)
        )
    return min(costs, key=lambda k: (costs[k], k != "gather"))

"""The ensemble experiment of Deng et al. (2024), "Efficient Ensembles Improve Training
Data Attribution", on ``digits_mlp``: LDS against ensemble size for the naive ensemble
(independently trained models), dropout ensembles (``member`` and ``example`` masks),
TRAK's Q-only dropout variant and LoRA ensembles, with the three costs (training
seconds, attribution seconds, bytes of parameters stored).

Every ensemble is a :class:`jattri.Members` (stacked arrays: checkpoints, dropout keys,
LoRA adapters over their base) and every method averages over the members it is given
inside one compiled program, so the ensemble of size K is scored as the first K members
of one ensemble of size max(sizes) (:func:`prefix`: rows of the stacked arrays, no
copies). Attribution seconds of size K are one ``cache`` + ``attribute`` call on those
K members (compilation included). Training seconds are measured separately for every K
(naive: K models vmapped; LoRA: base + K adapters vmapped).

Run: ``python -m jattri.benchmark.ensembles`` (or ``python -m jattri.bench --ensemble``).

:func:`run_grid` frames the comparison as the paper does: ensembles built on I trained
models with K dropout masks / LoRA adapters each, against naive ensembles of I models,
with training cost counted in full-model trainings. Every member is scored once
(:func:`member_scores`) and each I×K ensemble is the average over its members
(:func:`ensemble_of`), so the whole grid costs one pass over its largest ensemble
(``notebooks/03_ensembles.ipynb``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jattri
from jattri import benchmark
from jattri.benchmark import digits
from jattri.ensemble import dropout, dropout_trak, independent, lora, param_bytes, timed
from jattri.methods._common import num_params
from jattri.task import Members, Task, member

KINDS = ("naive", "dropout_member", "dropout_example", "trak_q_member", "trak_q_example",
         "lora")
METHODS = ("trak", "grad_dot", "influence_cg")
GRID_METHODS = ("trak", "grad_dot", "influence_arnoldi")
GRID_KINDS = ("naive", "dropout", "lora")


def _stderr(msg: str) -> None:
    print(f"[jattri.ensembles] {msg}", file=sys.stderr, flush=True)


def prefix(members: Members, k: int) -> Members:
    """The first ``k`` of ``members`` as Members of their own.

    A leaf with R rows serves M/R consecutive members per row; the prefix keeps the
    rows its members use (a slice, no copy; a shared single row stays as it is). Only
    when M/R does not divide k are rows gathered per member.
    """
    m = members.num
    if not 1 <= k <= m:
        raise ValueError(f"prefix of {k} members of an ensemble of {m}")

    def take(x):
        rows = x.shape[0]
        per_row = m // rows
        if rows == 1:
            return x
        if k % per_row == 0:
            return x[:k // per_row]
        return x[jnp.arange(k) // per_row]

    aux = None if members.aux is None else jax.tree_util.tree_map(take, members.aux)
    return Members(jax.tree_util.tree_map(take, members.params), aux=aux, num=k)


def _attributor(method: str, task: Task, *, proj_dim: int, proj_key, damping: float,
                rank: int = 100, shared_projection: bool = False):
    if method == "trak":
        return jattri.trak(task, proj_dim=proj_dim, key=proj_key,
                           shared_projection=shared_projection)
    if method == "grad_dot":
        return jattri.grad_dot(task)
    if method == "influence_cg":
        return jattri.influence_cg(task, damping=damping)
    if method == "influence_arnoldi":
        return jattri.influence_arnoldi(task, damping=damping, rank=rank, key=proj_key)
    raise ValueError(f"unknown method {method!r}; choose from "
                     f"{sorted(set(METHODS + GRID_METHODS))}")


def ensemble_scores(method: str, task: Task, members: Members, train, test, *,
                    proj_dim: int, proj_key, damping: float):
    """``(scores, seconds)``: the method's scores averaged over ``members`` (one
    ``cache`` + ``attribute``; the average is the method's own), and their serving
    time."""
    attr = _attributor(method, task, proj_dim=proj_dim, proj_key=proj_key, damping=damping)
    scores, seconds = timed(lambda: attr.attribute(attr.cache(members, train), test))
    return np.asarray(scores, np.float64), seconds


def run_ensembles(setting: str = "digits_mlp", *, methods: Sequence[str] = METHODS,
                  kinds: Sequence[str] = KINDS, sizes: Sequence[int] = (1, 2, 5, 10),
                  cg_test: Optional[int] = 20, cg_sizes: Sequence[int] = (1, 2, 5),
                  proj_dim: int = 512, damping: float = 1e-3, lora_rank: int = 4,
                  lora_steps: int = 200, lora_lr: float = 1e-3, seed: int = 0,
                  cache: Optional[str] = None,
                  progress: Optional[Callable[[str], None]] = _stderr) -> List[dict]:
    """Run the experiment; one row per (method, kind, size).

    Row keys: ``method, kind, size, lds, train_s, attribution_s, stored_bytes,
    grad_dim, n_test, note``. ``cg_test``: influence_cg is scored on the first
    ``cg_test`` test examples only (``None``: all) and only for ``cg_sizes`` (it
    solves one CG system per test example per member).
    """
    say = progress or (lambda m: None)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown ensemble kind {k!r}; choose from {KINDS}")
    bench = benchmark.load(setting, cache=cache, progress=progress)
    cfg = digits.SETTINGS[setting]
    subsets, targets = bench.lds
    train = tuple(jnp.asarray(a) for a in bench.train)
    test = tuple(jnp.asarray(a) for a in bench.test)
    key = jax.random.PRNGKey(seed)
    k_drop, k_lora, k_proj = jax.random.split(key, 3)
    K = max(sizes)
    xtr, ytr = bench.train

    def train_fn(seeds):
        idx = np.tile(np.arange(len(ytr), dtype=np.int32), (len(seeds), 1))
        return digits.train_models(cfg, xtr, ytr, idx, seeds)

    def naive_cost(k):
        return independent(train_fn, np.arange(k), bench.loss_fn, bench.target_fn)[2]

    # naive ensemble: train K models once for the members; time every size separately
    say(f"training naive ensembles of sizes {list(sizes)}")
    task, naive, _ = independent(train_fn, np.arange(K), bench.loss_fn, bench.target_fn)
    naive_costs = {k: naive_cost(k) for k in sizes}
    base = prefix(naive, 1)
    model_bytes = param_bytes(base.params)
    base_s = (naive_costs[1] if 1 in naive_costs else naive_cost(1)).train_seconds

    ensembles, costs = {}, {}
    for kind in kinds:
        if kind == "naive":
            ensembles[kind] = (task, naive)
            costs[kind] = {k: (naive_costs[k].train_seconds, naive_costs[k].stored_bytes)
                           for k in sizes}
        elif kind.startswith("dropout_"):
            ensembles[kind] = dropout(task, base, K, k_drop, mode=kind.split("_")[1])
            costs[kind] = {k: (base_s, model_bytes) for k in sizes}
        elif kind.startswith("trak_q_"):
            costs[kind] = {k: (base_s, model_bytes) for k in sizes}
        elif kind == "lora":
            say(f"fine-tuning LoRA ensembles (rank {lora_rank}, {lora_steps} steps)")
            kw = dict(rank=lora_rank, steps=lora_steps, learning_rate=lora_lr)
            ensembles[kind] = lora(task, base, train, K, k_lora, **kw)[:2]
            costs[kind] = {}
            for k in sizes:
                c = lora(task, base, train, k, k_lora, base_train_seconds=base_s, **kw)[2]
                costs[kind][k] = (c.train_seconds, c.stored_bytes)

    rows = []
    for method in methods:
        m_sizes = [k for k in sizes if method != "influence_cg" or k in cg_sizes]
        n_test = test[1].shape[0]
        if method == "influence_cg" and cg_test is not None:
            n_test = min(int(cg_test), n_test)
        m_test = tuple(a[:n_test] for a in test)
        m_targets = targets[:, :n_test]
        note = "" if n_test == test[1].shape[0] else f"first {n_test} test examples"
        for kind in kinds:
            if kind.startswith("trak_q_") and method != "trak":
                continue
            say(f"{method} / {kind}")
            for k in m_sizes:
                if kind.startswith("trak_q_"):
                    attr = dropout_trak(task, k, k_drop, mode=kind.split("_")[2],
                                        proj_dim=proj_dim, proj_key=k_proj)
                    scores, seconds = timed(
                        lambda: attr.attribute(attr.cache(base, train), m_test))
                    scores, members = np.asarray(scores, np.float64), base
                else:
                    ens_task, ens_members = ensembles[kind]
                    members = prefix(ens_members, k)
                    scores, seconds = ensemble_scores(method, ens_task, members, train,
                                                      m_test, proj_dim=proj_dim,
                                                      proj_key=k_proj, damping=damping)
                rows.append(_row(method, kind, k, scores, subsets, m_targets,
                                 costs[kind][k], seconds, num_params(members), n_test, note))
            say(f"{method} / {kind}: " + ", ".join(
                f"K={r['size']}: {r['lds']:.3f}" for r in rows[-len(m_sizes):]))
    return rows


class MemberScores(NamedTuple):
    """Every member of an ensemble scored on its own (see :func:`member_scores`).

    scores: ``(M, n_train, n_test)`` float32, member m's scores (TRAK: without Q).
    q: ``(M, n_train)`` TRAK's Q = 1 − p of member m, or ``None`` for other methods.
    seconds: ``(M,)`` wall seconds of member m's ``cache`` + ``attribute``.
    """

    scores: np.ndarray
    q: Optional[np.ndarray]
    seconds: np.ndarray


def select(members: Members, rows: Sequence[int]) -> Members:
    """Members ``rows`` (ints in ``[0, M)``, in that order) as Members of their own."""
    picked = [member(members, int(j)) for j in rows]
    stack = lambda *xs: jnp.stack(xs)
    params = jax.tree_util.tree_map(stack, *[p for p, _ in picked])
    aux = None if members.aux is None else jax.tree_util.tree_map(stack, *[a for _, a in picked])
    return Members(params, aux=aux, num=len(picked))


def member_scores(method: str, task: Task, members: Members, train, test, *,
                  proj_dim: int = 512, proj_key=None, damping: float = 1e-3,
                  rank: int = 100) -> MemberScores:
    """Score every member of an ensemble on its own, so that the scores of the ensemble
    of any subset R of its members are :func:`ensemble_of` ``(result, R)``.

    The methods average over members: Grad-Dot and influence score the mean of the
    members' scores; TRAK averages its two factors apart,
    ``[mean_m Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_t,m]_i · mean_m Q_m,i``, so for TRAK
    ``scores[m]`` is member m's first factor (its state's Q set to 1) and ``q[m]`` its
    Q. Member m gets ``fold_in(proj_key, m)`` as its projection key, the key it has as
    member m of one call, so TRAK and Grad-Dot sub-ensembles equal one call on their
    members; Arnoldi's start vector is then ``fold_in(fold_in(proj_key, m), 0)``, another
    draw than in one call. ``seconds[m]`` is member m's ``cache`` + ``attribute`` with
    the programs compiled (an untimed first call compiles them).

    Members are scored one at a time (a loop, not one call): one pass then gives the
    scores of every nested ensemble of a grid.
    """
    proj_key = jax.random.PRNGKey(0) if proj_key is None else proj_key

    def one(j):
        attr = _attributor(method, task, proj_dim=proj_dim, damping=damping, rank=rank,
                           proj_key=jax.random.fold_in(proj_key, j),
                           shared_projection=True)
        state = attr.cache(select(members, [j]), train)
        q = None
        if method == "trak":
            q = np.asarray(state.q)
            state = state._replace(q=jnp.ones_like(state.q))
        return np.asarray(attr.attribute(state, test), np.float32), q

    one(0)  # compiles; every member then reuses the programs
    scores, qs, seconds = [], [], []
    for j in range(members.num):
        (s, q), t = timed(one, j)
        scores.append(s)
        qs.append(q)
        seconds.append(t)
    q = None if qs[0] is None else np.stack(qs)
    return MemberScores(np.stack(scores), q, np.asarray(seconds))


def ensemble_of(scores: MemberScores, rows: Sequence[int]) -> np.ndarray:
    """``(n_train, n_test)`` float64 scores of the ensemble of members ``rows``:
    mean_{m∈rows} scores[m], times mean_{m∈rows} q[m] (per training example) for TRAK."""
    rows = np.asarray(rows, np.int64)
    out = scores.scores[rows].astype(np.float64).mean(axis=0)
    if scores.q is not None:
        out = out * scores.q[rows].astype(np.float64).mean(axis=0)[:, None]
    return out


def grid_rows(num_models: int, per_model: int, stride: int) -> np.ndarray:
    """Members of the ensemble of ``num_models`` models × ``per_model`` masks/adapters
    inside one built with ``stride`` per model (member c·stride + k is model c's k-th)."""
    return (np.arange(num_models)[:, None] * stride + np.arange(per_model)[None]).ravel()


def rate_task(setting: str = "digits_mlp") -> Task:
    """The setting's Task with a dropout-rate argument, for :func:`jattri.ensemble.dropout`
    with ``rate=``: ``loss_fn(params, example, rng=None, rate=None)`` runs the model
    with dropout ``rate`` under key ``rng`` (``rate=None``: the model's own rate)."""
    model = digits.make_model(digits.SETTINGS[setting])

    def loss_fn(params, example, rng=None, rate=None):
        x, y = example
        net = model if rate is None else model.clone(dropout_rate=rate)
        train_mode = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
        logits = net.apply({"params": params}, x[None], **train_mode)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return Task(loss_fn)


class GridResult(NamedTuple):
    """rows: one dict per (method, kind, I, K) or (method, dropout rate, K); keys
    ``method, kind, models, per_model, members, rate, lds, train_cost, serving_s,
    stored_bytes, grad_dim``. info: the costs the rows are counted in."""

    rows: List[dict]
    info: dict


def run_grid(setting: str = "digits_mlp", *, methods: Sequence[str] = GRID_METHODS,
             kinds: Sequence[str] = GRID_KINDS, models: Sequence[int] = (1, 2, 5),
             per_model: Sequence[int] = (1, 2, 5, 10), naive: Sequence[int] = (1, 2, 5, 10),
             rates: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
             rate_methods: Sequence[str] = ("trak", "grad_dot"), mode: str = "example",
             proj_dim: int = 512, damping: float = 1e-3, rank: int = 100,
             lora_rank: int = 4, lora_steps: int = 200, lora_lr: float = 1e-3,
             seed: int = 0, cache: Optional[str] = None,
             progress: Optional[Callable[[str], None]] = _stderr) -> GridResult:
    """The paper's comparison: LDS against training cost, serving cost and storage.

    * ``naive``: ensembles of I independently trained models, I in ``naive`` (the
      setting's cached full models, seeds 0, 1, ...);
    * ``dropout``: on the first I of those models, K dropout masks each (``mode``, the
      model's own rate), I in ``models``, K in ``per_model``;
    * ``lora``: on the same I models, K LoRA adapters each (rank ``lora_rank``,
      ``lora_steps`` Adam steps of minibatch 50);
    * dropout-rate sweep: one model, K masks at each rate of ``rates``, for
      ``rate_methods`` (rows of kind ``"dropout"`` with ``rate`` set).

    Costs: ``train_cost`` in full-model trainings, counted in example gradients (a
    LoRA adapter = ``lora_steps · 50 / (epochs · n_train)`` of a model: naive I,
    dropout I, LoRA I·(1 + K·that)); ``serving_s`` = the sum of the ensemble members'
    ``cache`` + ``attribute`` seconds (:func:`member_scores`); ``stored_bytes`` =
    parameters kept (I models; LoRA: + I·K adapters). ``info``: ``model_train_s``,
    seconds per model of the setting's ground-truth build (all models vmapped);
    ``adapter_train_s``, seconds per adapter of the LoRA fine-tuning (compilation
    included); ``adapter_cost``, ``model_bytes``, ``adapter_bytes``.
    """
    say = progress or (lambda m: None)
    for k in kinds:
        if k not in GRID_KINDS:
            raise ValueError(f"unknown grid kind {k!r}; choose from {GRID_KINDS}")
    for m in tuple(methods) + tuple(rate_methods):
        if m not in GRID_METHODS:
            raise ValueError(f"unknown grid method {m!r}; choose from {GRID_METHODS}")
    bench = benchmark.load(setting, cache=cache, progress=progress)
    cfg = digits.SETTINGS[setting]
    if max(naive) > len(bench.models_full) or max(models) > len(bench.models_full):
        raise ValueError(f"{setting} has {len(bench.models_full)} trained models; the grid "
                         f"asks for {max(max(naive), max(models))}")
    subsets, targets = bench.lds
    train = tuple(jnp.asarray(a) for a in bench.train)
    test = tuple(jnp.asarray(a) for a in bench.test)
    k_drop, k_lora, k_proj = jax.random.split(jax.random.PRNGKey(seed), 3)
    task = Task(bench.loss_fn, bench.target_fn)
    P, K = max(models), max(per_model)
    bases = jattri.checkpoints(bench.models_full[:P])
    model_bytes = param_bytes(bench.models_full[0])
    n = len(bench.train[1])
    bs = n if cfg.batch_size is None else min(cfg.batch_size, n)
    adapter_cost = lora_steps * min(50, n) / (cfg.epochs * (n // bs) * bs)
    models_trained = cfg.num_full + cfg.num_subsets * cfg.num_seeds
    info = {"setting": setting, "adapter_cost": adapter_cost, "model_bytes": model_bytes,
            "mode": mode, "n_test": int(test[1].shape[0]),
            "model_train_s": bench.info["train_seconds"] / models_trained}

    ensembles = {}  # kind -> (task, members, stride)
    if "naive" in kinds:
        ensembles["naive"] = (task, jattri.checkpoints(bench.models_full[:max(naive)]), None)
    if "dropout" in kinds:
        ensembles["dropout"] = dropout(task, bases, K, k_drop, mode=mode) + (K,)
    if "lora" in kinds:
        say(f"fine-tuning {P}x{K} LoRA adapters (rank {lora_rank}, {lora_steps} steps)")
        l_task, l_members, l_cost = lora(task, bases, train, K, k_lora, rank=lora_rank,
                                         steps=lora_steps, learning_rate=lora_lr)
        ensembles["lora"] = (l_task, l_members, K)
        info["adapter_train_s"] = l_cost.train_seconds / (P * K)
        info["adapter_bytes"] = (l_cost.stored_bytes - param_bytes(bases.params)) // (P * K)

    def lds(scores):
        return float(np.nanmean(jattri.metrics.lds(scores, subsets, targets)))

    rows = []

    def add(method, kind, i, k, ms, picked, rate=None, grad_dim=0):
        cost = {"naive": i, "dropout": i, "lora": i * (1 + k * adapter_cost)}[kind]
        stored = model_bytes * i + (info.get("adapter_bytes", 0) * i * k if kind == "lora"
                                    else 0)
        rows.append({"method": method, "kind": kind, "models": int(i), "per_model": int(k),
                     "members": len(picked), "rate": rate,
                     "lds": lds(ensemble_of(ms, picked)), "train_cost": float(cost),
                     "serving_s": float(ms.seconds[picked].sum()),
                     "stored_bytes": int(stored), "grad_dim": int(grad_dim)})

    kw = dict(proj_dim=proj_dim, proj_key=k_proj, damping=damping, rank=rank)
    for method in methods:
        for kind, (ens_task, members, stride) in ensembles.items():
            say(f"{method} / {kind}: scoring {members.num} members one by one")
            ms = member_scores(method, ens_task, members, train, test, **kw)
            dim = num_params(members)
            if kind == "naive":
                for i in naive:
                    add(method, kind, i, 1, ms, np.arange(i), grad_dim=dim)
            else:
                for i in models:
                    for k in per_model:
                        add(method, kind, i, k, ms, grid_rows(i, k, stride), grad_dim=dim)
            say(f"{method} / {kind}: " + ", ".join(
                f"{r['models']}x{r['per_model']}: {r['lds']:.3f}"
                for r in rows if r["method"] == method and r["kind"] == kind))
    if rates and rate_methods:
        r_task = rate_task(setting)
        one_base = jattri.checkpoints(bench.models_full[:1])
        for rate in rates:
            d_task, d_members = dropout(r_task, one_base, K, k_drop, rate=float(rate),
                                        mode=mode)
            for method in rate_methods:
                say(f"{method} / dropout rate {rate}")
                ms = member_scores(method, d_task, d_members, train, test, **kw)
                for k in per_model:
                    add(method, "dropout", 1, k, ms, np.arange(k), rate=float(rate),
                        grad_dim=num_params(d_members))
    return GridResult(rows, info)


def _row(method, kind, size, scores, subsets, targets, cost, seconds, grad_dim, n_test, note):
    per_test = jattri.metrics.lds(scores, subsets, targets)
    return {"method": method, "kind": kind, "size": int(size),
            "lds": float(np.nanmean(per_test)), "train_s": float(cost[0]),
            "attribution_s": float(seconds), "stored_bytes": int(cost[1]),
            "grad_dim": int(grad_dim), "n_test": int(n_test), "note": note}


def format_table(rows: List[dict]) -> str:
    head = (f"{'method':<13} {'ensemble':<16} {'K':>3} {'LDS':>7} {'train s':>8} "
            f"{'attr s':>8} {'stored KB':>10} {'grad dim':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<13} {r['kind']:<16} {r['size']:>3} {r['lds']:>7.3f} "
                     f"{r['train_s']:>8.1f} {r['attribution_s']:>8.1f} "
                     f"{r['stored_bytes'] / 1024:>10.1f} {r['grad_dim']:>9}  {r['note']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jattri.benchmark.ensembles",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="digits_mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--sizes", default="1,2,5,10")
    parser.add_argument("--cg-test", type=int, default=20,
                        help="influence_cg on the first N test examples (0: all)")
    parser.add_argument("--cg-sizes", default="1,2,5")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--cache", metavar="DIR")
    args = parser.parse_args(argv)
    from jattri.benchmark import _cli, digits
    _cli.split(args.setting, tuple(digits.SETTINGS), "setting", "--setting")
    methods = _cli.split(args.methods, METHODS, "method", "--methods")
    kinds = _cli.split(args.kinds, KINDS, "kind", "--kinds")

    def ints(text, option):
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise _cli.fail(f"{option} must be comma-separated positive ints, got {text!r}")
        return values

    sizes, cg_sizes = ints(args.sizes, "--sizes"), ints(args.cg_sizes, "--cg-sizes")
    for option, value in (("--cg-test", args.cg_test), ("--lora-rank", args.lora_rank - 1),
                          ("--lora-steps", args.lora_steps - 1)):
        if value < 0:
            raise _cli.fail(f"{option} must be {'>= 0' if option == '--cg-test' else '>= 1'}")
    if args.json:
        _cli.writable_file(args.json, "--json")
    if args.cache:
        _cli.usable_dir(args.cache, "--cache")
    t0 = time.perf_counter()
    rows = run_ensembles(args.setting, methods=methods,
                         kinds=kinds, sizes=sizes,
                         cg_test=args.cg_test or None, cg_sizes=cg_sizes,
                         lora_rank=args.lora_rank, lora_steps=args.lora_steps,
                         cache=args.cache)
    print(format_table(rows))
    print(f"\nwall time: {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "argv": sys.argv[1:]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

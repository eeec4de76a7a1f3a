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
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jattri
from jattri import benchmark
from jattri.benchmark import digits
from jattri.ensemble import dropout, dropout_trak, independent, lora, param_bytes, timed
from jattri.methods._common import num_params
from jattri.task import Members, Task

KINDS = ("naive", "dropout_member", "dropout_example", "trak_q_member", "trak_q_example",
         "lora")
METHODS = ("trak", "grad_dot", "influence_cg")


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


def _attributor(method: str, task: Task, *, proj_dim: int, proj_key, damping: float):
    if method == "trak":
        return jattri.trak(task, proj_dim=proj_dim, key=proj_key)
    if method == "grad_dot":
        return jattri.grad_dot(task)
    if method == "influence_cg":
        return jattri.influence_cg(task, damping=damping)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


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

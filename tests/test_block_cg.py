"""Block CG (``jattri.func.hessian.block_cg_solve``) and ``influence_cg``'s ``block``,
against float64 solves."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattri
from jattri.func.hessian import block_cg_solve, cg_solve


@pytest.fixture(autouse=True)
def _float64(x64):
    """Every test here in float64 (conftest's ``x64``), float32 where asked."""
    yield


def _spd(d, top, seed=0):
    """A symmetric positive-definite matrix: `len(top)` outlying eigenvalues `top`,
    the others spread over [1, 2]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = np.concatenate([np.asarray(top, float), 1 + rng.random(d - len(top))])
    return (q * w) @ q.T


def test_block_cg_solves_every_row_to_the_float64_solution():
    a = _spd(40, [50.0, 200.0, 900.0])
    b = np.random.default_rng(1).standard_normal((10, 40))
    want = np.linalg.solve(a, b.T).T
    aj = jnp.asarray(a)
    for block in (None, 1, 3, 4, 10):
        got = np.asarray(block_cg_solve(lambda v: v @ aj, jnp.asarray(b), maxiter=200,
                                        tol=1e-13, block=block))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=str(block))


def test_a_block_solves_in_fewer_products_than_one_cg_per_row():
    """With 6 outlying eigenvalues and 8 right-hand sides the block's shared Krylov
    space takes the outliers out for every row: after 5 steps each row's residual is
    below 1e-3 (4.6e-4 measured), where 5 steps of plain CG per row leave one above 1
    (3.05)."""
    a = _spd(60, [30.0, 80.0, 150.0, 400.0, 700.0, 1000.0], seed=2)
    b = np.random.default_rng(3).standard_normal((8, 60))
    aj, bj = jnp.asarray(a), jnp.asarray(b)

    def residual(x):
        return np.max(np.linalg.norm(b - np.asarray(x) @ a, axis=1) / np.linalg.norm(b, axis=1))

    assert residual(block_cg_solve(lambda v: v @ aj, bj, maxiter=5, tol=0.0)) < 1e-3
    assert residual(cg_solve(lambda v: aj @ v, bj, maxiter=5, tol=0.0)) > 1.0


def test_zero_and_repeated_rows():
    """Zero rows (padding) stay zero; a block with repeated rows (rank-deficient) does
    not break down: its duplicate directions are dropped."""
    a = _spd(30, [100.0])
    rng = np.random.default_rng(4)
    base = rng.standard_normal((3, 30))
    b = np.concatenate([base, base, np.zeros((2, 30)), 2 * base[:1]])   # 9 rows, rank 3
    got = np.asarray(block_cg_solve(lambda v: v @ jnp.asarray(a), jnp.asarray(b),
                                    maxiter=100, tol=1e-12))
    np.testing.assert_allclose(got, np.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-10)
    assert np.all(got[6:8] == 0)


def test_an_indefinite_matrix_gives_nan():
    a = _spd(20, [10.0])
    a -= 3.0 * np.eye(20)                     # eigenvalues in [-2, -1] and 7
    b = np.random.default_rng(5).standard_normal((4, 20))
    got = np.asarray(block_cg_solve(lambda v: v @ jnp.asarray(a), jnp.asarray(b),
                                    maxiter=50, tol=1e-10))
    assert np.all(np.isnan(got))


def test_float32_block_stops_at_its_tolerance():
    """float32, condition number 1,000, 40 outlying eigenvalues, 32 right-hand sides:
    with the second A-orthonormalisation pass the block reaches ``tol=1e-5`` in 13
    steps (a single pass does not stop within 20: it runs into the 2·d stop at 21, and
    without that stop needed 50) and is within 1e-3 of the float64 solution (4.9e-5
    measured); plain CG after 20 steps is 0.14 away."""
    a = _spd(300, np.geomspace(5.0, 1000.0, 40), seed=6)
    b = np.random.default_rng(7).standard_normal((32, 300))
    want = np.linalg.solve(a, b.T).T
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    def err(x):
        return np.max(np.abs(np.asarray(x, np.float64) - want)) / np.max(np.abs(want))

    def solve(k):
        return np.asarray(block_cg_solve(lambda v: v @ a32, b32, maxiter=k, tol=1e-5))

    assert np.array_equal(solve(20), solve(21))          # it stopped within 20 steps
    assert err(solve(20)) < 1e-3
    assert err(cg_solve(lambda v: a32 @ v, b32, maxiter=20, tol=1e-5)) > 1e-2


def test_block_cg_refuses_an_unbatched_rhs():
    with pytest.raises(ValueError, match=r"b must be \(k, d\)"):
        block_cg_solve(lambda v: v, jnp.ones(3), maxiter=2, tol=1e-6)


def _problem(seed=0, n=40, d_in=5, classes=3):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((d_in, classes)) * 0.5),
              "b": jnp.asarray(rng.standard_normal(classes) * 0.1)}
    x = jnp.asarray(rng.standard_normal((n, d_in)))
    y = jnp.asarray(rng.integers(0, classes, n))
    xt = jnp.asarray(rng.standard_normal((7, d_in)))
    yt = jnp.asarray(rng.integers(0, classes, 7))

    def loss(p, z):
        xi, yi = z
        return -jax.nn.log_softmax(xi @ p["w"] + p["b"])[yi]
    return loss, params, (x, y), (xt, yt)


def test_influence_cg_blocks_equal_explicit_influence():
    """Every block size gives explicit influence's scores (float64, converged), with
    the test side split over several blocks (7 test examples, blocks of 1, 2, 3, 128)
    and the train side's systems (``self_attribute``)."""
    loss, params, train, test = _problem()
    exact = jattri.influence_explicit(loss, damping=0.05)
    st = exact.cache(params, train)
    want, want_self = np.asarray(exact.attribute(st, test)), np.asarray(exact.self_attribute(st))
    for block in (1, 2, 3, 128):
        attr = jattri.influence_cg(loss, damping=0.05, maxiter=300, tol=1e-12, block=block)
        s = attr.cache(params, train)
        np.testing.assert_allclose(np.asarray(attr.attribute(s, test)), want,
                                   rtol=1e-7, atol=1e-9, err_msg=str(block))
        np.testing.assert_allclose(np.asarray(attr.self_attribute(s)), want_self,
                                   rtol=1e-7, atol=1e-9, err_msg=str(block))


@pytest.mark.parametrize("value, err, match", [
    (0, ValueError, "`block` must be an int >= 1"),
    (2.0, TypeError, "`block` must be an int"),
    ("8", TypeError, "`block` must be an int"),
])
def test_influence_cg_checks_block(value, err, match):
    loss, *_ = _problem()
    with pytest.raises(err, match=match):
        jattri.influence_cg(loss, block=value)


def test_block_cg_stops_once_it_has_searched_twice_the_dimension():
    """float32 at condition number 10⁴ with ``tol=0`` (out of reach): the block stops
    once its directions number 2·d (40 unknowns, 8 rows: 14 steps, fewer than 8
    directions kept in some), not at ``maxiter``; without that stop it was still
    running after 59 steps. Its answer is at float32's reach of the float64 solution
    (9.7e-4 measured; 4.5e-4 after 1,000 steps without the stop)."""
    a = _spd(40, np.geomspace(10.0, 1e4, 6), seed=9)
    b = np.random.default_rng(10).standard_normal((8, 40))
    want = np.linalg.solve(a, b.T).T
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    solve = lambda k: np.asarray(block_cg_solve(lambda v: v @ a32, b32, maxiter=k, tol=0.0))
    assert np.array_equal(solve(20), solve(1000))
    assert not np.array_equal(solve(5), solve(1000))
    assert np.max(np.abs(solve(1000) - want)) / np.max(np.abs(want)) < 5e-3


def test_in_groups_changes_no_solution():
    """Plain and block CG with the systems split in groups (``at_once``) give the
    float64 solution of every row, as all at once does: 23 rows, blocks of 4 (6 blocks,
    the last padded), groups of 1-7 blocks or rows."""
    a = _spd(30, [40.0, 300.0])
    b = np.random.default_rng(3).standard_normal((23, 30))
    want = np.linalg.solve(a, b.T).T
    aj, bj = jnp.asarray(a), jnp.asarray(b)
    for at_once in (None, 1, 3, 4, 5, 8, 22, 23, 100):
        block = np.asarray(block_cg_solve(lambda v: v @ aj, bj, maxiter=100, tol=1e-13,
                                          block=4, at_once=at_once))
        plain = np.asarray(cg_solve(lambda v: aj @ v, bj, maxiter=100, tol=1e-13,
                                    at_once=at_once))
        np.testing.assert_allclose(block, want, rtol=1e-9, atol=1e-11, err_msg=str(at_once))
        np.testing.assert_allclose(plain, want, rtol=1e-9, atol=1e-11, err_msg=str(at_once))


def test_influence_cg_in_groups_equals_explicit_influence():
    """``chunk_size=2`` makes ``attribute`` solve its 7 test systems in groups (of 2
    rows, or one block of 3): the scores are still explicit influence's."""
    loss, params, train, test = _problem(seed=4)
    exact = jattri.influence_explicit(loss, damping=0.05)
    want = np.asarray(exact.attribute(exact.cache(params, train), test))
    for block in (1, 3):
        attr = jattri.influence_cg(loss, damping=0.05, maxiter=300, tol=1e-12, block=block,
                                   chunk_size=2)
        np.testing.assert_allclose(np.asarray(attr.attribute(attr.cache(params, train), test)),
                                   want, rtol=1e-7, atol=1e-9, err_msg=str(block))


def test_lissa_in_groups_draws_the_same_minibatches():
    """LiSSA with minibatches of 10: its 7 test systems solved 2 at a time
    (``chunk_size=2``) give the scores of all at once, every group drawing the same
    minibatches; a wrong grouping (another key per group) would not."""
    loss, params, train, test = _problem(seed=5)
    scores = {}
    for chunk in (None, 2):
        attr = jattri.influence_lissa(loss, damping=0.05, depth=60, batch_size=10, repeats=2,
                                      chunk_size=chunk)
        scores[chunk] = np.asarray(attr.attribute(attr.cache(params, train), test))
    np.testing.assert_allclose(scores[2], scores[None], rtol=1e-10, atol=1e-12)
    assert np.abs(scores[None]).max() > 0


def test_cg_rows_follow_the_chunk_budget():
    """Systems solved at once: the chunk budget over 8·d floats (4·d with ``block=1``),
    or the user's ``chunk_size``."""
    from jattri import engine
    from jattri.methods import influence
    from jattri.task import as_members
    members = lambda d: as_members({"w": jnp.zeros((d,), jnp.float32)})
    budget = engine.DEFAULT_CHUNK_BYTES
    assert influence._cg_rows(None, members(7850), 128) == budget // (4 * 8 * 7850)
    assert influence._cg_rows(None, members(7850), 1) == budget // (4 * 4 * 7850)
    assert influence._cg_rows(None, members(10**9), 128) == 1
    assert influence._cg_rows(64, members(7850), 128) == 64


# A linear model with d = 50,010 parameters, 640 training and 512 test examples (more
# training examples, so that the test side's systems are solved), blocks of 128, 2
# steps, the attribute call compiled ahead of time; the peak resident memory of the
# run itself (high-water mark reset just before it, as in test_scale_memory.py), by
# default and with every system at once (chunk_size=512).
_CG_MEMORY = textwrap.dedent(r"""
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    import jattri

    page = os.sysconf("SC_PAGE_SIZE")

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def rss_peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

    d_in, classes = 5_000, 10
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(d_in, classes)) * 0.01, jnp.float32),
              "b": jnp.zeros(classes, jnp.float32)}

    def data(n):
        return (jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32),
                jnp.asarray(rng.integers(0, classes, n), jnp.int32))

    def loss(p, z):
        x, y = z
        return -jax.nn.log_softmax(x @ p["w"] + p["b"])[y]

    train, test = data(640), data(512)
    out = {}
    for name, chunk in (("default", None), ("all at once", 512)):
        attr = jattri.influence_cg(loss, damping=0.1, maxiter=2, block=128, chunk_size=chunk)
        state = jax.block_until_ready(attr.cache(params, train))
        compiled = jax.jit(lambda s, t, a=attr: a.attribute(s, t)).lower(state, test).compile()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = rss_now()
        scores = jax.block_until_ready(compiled(state, test))
        out[name] = dict(peak=rss_peak() - before, shape=list(scores.shape),
                         finite=bool(jnp.all(jnp.isfinite(scores))))
        del scores
    print("RESULT " + json.dumps(out))
""")


def test_cg_holds_one_block_of_vectors_at_a_time_on_a_large_model():
    """d = 50,010, 512 test systems in blocks of 128. With every system at once
    (the control) the call's peak holds all four blocks' eight (128, d) CG arrays
    (819 MB; 1,076 MB measured). By default (a 256 MiB budget: 167 systems' CG
    vectors) one block runs at a time: the peak is below the control by at least half
    of the three other blocks' arrays (614 MB; 470 MB less measured: 606 MB)."""
    d = 5_000 * 10 + 10
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_X64="0",
               XLA_FLAGS=os.environ.get("JATTRI_TEST_FAST_XLA", ""))
    proc = subprocess.run([sys.executable, "-c", _CG_MEMORY], capture_output=True,
                          text=True, timeout=300, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    out = json.loads(lines[0][len("RESULT "):])
    for run in out.values():
        assert run["shape"] == [640, 512] and run["finite"], out
    assert out["all at once"]["peak"] > 8 * 512 * d * 4, out
    assert out["default"]["peak"] < out["all at once"]["peak"] - 0.5 * 8 * 384 * d * 4, out


def test_cg_runs_past_convergence_without_reading_it_as_singular():
    """A linear softmax model at zero weights: its damped Hessian has 52 distinct
    eigenvalues, so CG converges exactly well before 50 steps. With ``tol=0`` the
    residual used to shrink on into underflow, pᵀAp read 0, and both solvers returned
    NaN (``influence_cg`` raised, calling H + λI singular). Now they stop at eps and
    give explicit influence's scores (float32, 1e-4 relative)."""
    jax.config.update("jax_enable_x64", False)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(400, 50)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 400), jnp.int32)
    params = {"w": jnp.zeros((50, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}

    def loss(p, z):
        return -jax.nn.log_softmax(z[0] @ p["w"] + p["b"])[z[1]]

    test = (x[:40], y[:40])
    exact = jattri.influence_explicit(loss, damping=0.1)
    want = np.asarray(exact.attribute(exact.cache(params, (x, y)), test))
    for block in (1, 128):
        attr = jattri.influence_cg(loss, damping=0.1, maxiter=50, tol=0.0, block=block)
        got = np.asarray(attr.attribute(attr.cache(params, (x, y)), test))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=str(block))


def test_progress_reports_the_solve_group_by_group():
    """Under ``jattri.progress`` CG's and LiSSA's solves are stages of their own. CG's
    counts the test examples whose systems are solved, a group at a time: 7 test
    examples with ``chunk_size=2`` go as 4 groups of 2 rows, or 3 blocks of 3.
    LiSSA's counts its recursion steps (``unit="LiSSA steps"``), depth per group of
    systems: every step at depth 30, every third at depth 250 (about 100 reports a
    recursion) and the last. The scores equal those computed without reporting: CG's
    bitwise (the same program per group); LiSSA's to 1e-12 (float64), its recursion
    run in segments, one program call each, which XLA may compile into a different
    order of the same operations."""
    loss, params, train, test = _problem(seed=7)
    every_third = [g * 250 + i for g in range(4) for i in list(range(3, 250, 3)) + [250]]
    cases = (("cg solve", [2, 4, 6, 7], 7, "examples", dict(block=1)),
             ("cg solve", [3, 6, 7], 7, "examples", dict(block=3)),
             ("lissa solve", list(range(1, 121)), 120, "LiSSA steps", dict(depth=30)),
             ("lissa solve", every_third, 1000, "LiSSA steps", dict(depth=250)))
    for stage, want, total, unit, kw in cases:
        attr = (jattri.influence_lissa(loss, damping=0.05, chunk_size=2, **kw)
                if "depth" in kw else
                jattri.influence_cg(loss, damping=0.05, maxiter=50, chunk_size=2, **kw))
        state = attr.cache(params, train)
        quiet = np.asarray(attr.attribute(state, test))
        seen = []
        with jattri.progress(lambda p: seen.append((p.stage, p.done, p.total, p.unit))):
            loud = np.asarray(attr.attribute(state, test))
        solves = [(done, t, u) for name, done, t, u in seen if name == stage]
        assert [done for done, _, _ in solves] == want, (stage, seen)
        assert all((t, u) == (total, unit) for _, t, u in solves), seen
        if "depth" in kw:
            np.testing.assert_allclose(loud, quiet, rtol=1e-12, atol=0)
        else:
            np.testing.assert_array_equal(loud, quiet)


def test_progress_solves_cgs_groups_one_call_each():
    """Inside ``progress`` CG's groups of systems are solved one program call each,
    driven from the host (no host callback, so the program is cached): two members,
    7 test examples in groups of 4 and 3 blocks of 3 (the last group padded with zero
    rows), and the training set's own systems (``self_attribute``), equal the quiet
    results bitwise; the stage counts members × examples."""
    loss, params, train, test = _problem(seed=3)
    members = jattri.checkpoints([params, jax.tree_util.tree_map(lambda x: 0.8 * x, params)])
    for block, chunk in ((1, 4), (3, 2)):
        attr = jattri.influence_cg(loss, damping=0.05, maxiter=50, block=block,
                                   chunk_size=chunk)
        state = attr.cache(members, train)
        quiet = np.asarray(attr.attribute(state, test))
        quiet_self = np.asarray(attr.self_attribute(state))
        seen = []
        with jattri.progress(lambda p: seen.append((p.stage, p.done, p.total))):
            loud = np.asarray(attr.attribute(state, test))
            loud_self = np.asarray(attr.self_attribute(state))
        np.testing.assert_array_equal(loud, quiet)
        np.testing.assert_array_equal(loud_self, quiet_self)
        solves = [(done, total) for name, done, total in seen if name == "cg solve"]
        assert solves[-1] == (14, 14) and solves[0][0] < 14, solves


def test_progress_runs_lissas_recursion_in_segments():
    """Inside ``progress`` LiSSA's recursion runs in segments of steps, one call each
    of a program without callbacks, member by member, group by group and repeat by
    repeat: two members, 7 test examples in groups of 3 (the last padded with zero
    rows), two repeats on minibatches of 10, at depth 25 (a report every step) and
    205 (every third step; the last segment one step). The scores equal the quiet
    ones to 1e-12 (float64); the stage ends at members × groups × repeats × depth."""
    loss, params, train, test = _problem(seed=5)
    members = jattri.checkpoints([params, jax.tree_util.tree_map(lambda x: 0.8 * x, params)])
    for depth, reports in ((25, 2 * 3 * 2 * 25), (205, 2 * 3 * 2 * 69)):
        attr = jattri.influence_lissa(loss, damping=0.05, depth=depth, repeats=2,
                                      batch_size=10, chunk_size=3)
        state = attr.cache(members, train)
        quiet = np.asarray(attr.attribute(state, test))
        seen = []
        with jattri.progress(lambda p: seen.append((p.stage, p.done, p.total))):
            loud = np.asarray(attr.attribute(state, test))
        np.testing.assert_allclose(loud, quiet, rtol=1e-12, atol=1e-14)
        solves = [(done, total) for name, done, total in seen if name == "lissa solve"]
        total = 2 * 3 * 2 * depth
        assert len(solves) == reports and solves[-1] == (total, total), solves[-3:]
        assert all(b[0] > a[0] for a, b in zip(solves, solves[1:]))

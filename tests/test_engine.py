"""The method contract's machinery: Members, streams, chunking, tiled top-k scoring.

References are the dense formulas written out with numpy in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jattri
from _toy import assert_top_k_matches_dense
from jattri import engine

pytestmark = pytest.mark.usefixtures("x64")


def loss(p, z):
    x, y = z
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)


def target(p, z):
    return 2.0 * loss(p, z) + jnp.sum(p["w"]) * 0.0


def data(seed, n, d=5, c=3):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, c))


def params(seed, d=5, c=3):
    kw, kb = jax.random.split(jax.random.PRNGKey(100 + seed))
    return {"w": jax.random.normal(kw, (d, c)), "b": 0.1 * jax.random.normal(kb, (c,))}


def grads(p, fn, z):
    theta, unravel = ravel_pytree(p)
    return np.asarray(jax.vmap(jax.grad(lambda t, e: fn(unravel(t), e)), (None, 0))(theta, z))


def batches(z, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(jax.tree_util.tree_map(lambda a: a[start:start + s], z))
        start += s
    assert start == len(z[1])
    return out


# --------------------------------------------------------------------------- members

def test_members_share_params_rows():
    """P = 1 params row for M = 3 members (a dropout ensemble's layout): every member
    uses that row, so the mean over members equals the single model's scores."""
    p = params(0)
    train, test = data(1, 12), data(2, 4)
    shared = jattri.Members(jax.tree_util.tree_map(lambda a: a[None], p), num=3)
    attr = jattri.grad_dot(loss)
    one = attr.attribute(attr.cache(p, train), test)
    three = attr.attribute(attr.cache(shared, train), test)
    np.testing.assert_allclose(three, one, rtol=1e-12)
    np.testing.assert_allclose(one, grads(p, loss, train) @ grads(p, loss, test).T, rtol=1e-12)


def test_member_rows_follow_groups():
    """params with P = 2 rows for M = 4 members: members 0, 1 use row 0, members 2, 3
    row 1 (``j // (M // P)``), aux with M rows is taken row by row."""
    stacked = jattri.checkpoints([params(0), params(1)]).params
    members = jattri.Members(stacked, aux=jnp.arange(4.0), num=4)
    for j, (row, aux) in enumerate(((0, 0.0), (0, 1.0), (1, 2.0), (1, 3.0))):
        p, a = jattri.task.member(members, j)
        np.testing.assert_array_equal(p["w"], stacked["w"][row])
        assert float(a) == aux


def test_members_errors():
    with pytest.raises(ValueError, match="does not divide"):
        jattri.task.check_members(jattri.Members(jattri.checkpoints(
            [params(0), params(1)]).params, num=3))
    with pytest.raises(ValueError, match="mismatched checkpoints"):
        jattri.checkpoints([params(0), params(1, d=4)])
    with pytest.raises(TypeError, match="jattri.checkpoints"):
        jattri.grad_dot(loss).cache([params(0), params(1)], data(1, 5))
    with pytest.raises(TypeError, match="non-empty list"):
        jattri.checkpoints([])


# --------------------------------------------------------------------------- streams

@pytest.mark.parametrize("sizes", [(7, 7, 7, 7, 2), (1, 20, 9), (30,)])
def test_stream_chunks_recut_batches(sizes):
    """Any batch sizes are re-cut into the same fixed chunks: indices are global
    positions, the last chunk is padded and masked."""
    z = data(0, 30)
    got = list(engine.stream_chunks(jattri.stream(batches(z, sizes)), 8))
    assert [c for _, c in got] == [8, 8, 8, 6]
    index = np.concatenate([np.asarray(ch.index)[:c] for ch, c in got])
    np.testing.assert_array_equal(index, np.arange(30))
    x = np.concatenate([np.asarray(ch.data[0])[:c] for ch, c in got])
    np.testing.assert_array_equal(x, z[0])
    assert not np.asarray(got[-1][0].valid)[6:].any()


def test_stream_equals_in_memory_tracin_and_trak():
    """20 uneven batches give the in-memory state and scores (float32, 1e-6)."""
    jax.config.update("jax_enable_x64", False)
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params(0))
    train = jax.tree_util.tree_map(lambda a: a.astype(a.dtype), data(1, 100))
    test = data(2, 6)
    sizes = [3, 7] * 10
    for attr in (jattri.trak(loss, proj_dim=16, chunk_size=16),
                 jattri.tracin(loss, proj_dim=16, projection="sjlt", chunk_size=16)):
        full = attr.cache(p, train)
        streamed = attr.cache(p, jattri.stream(batches(train, sizes)))
        for a, b in zip(jax.tree_util.tree_leaves(full[2:]), jax.tree_util.tree_leaves(streamed[2:])):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(jnp.abs(a).max()))
        np.testing.assert_allclose(attr.attribute(streamed, test), attr.attribute(full, test),
                                   rtol=1e-6, atol=1e-6)


def test_one_shot_iterator_refused_on_second_pass():
    """A generator serves one pass (its first batch peeked for the checks is not
    lost); a second pass is refused with a clear error, nothing silently empty."""
    p, z, test = params(0), data(1, 20), data(2, 3)
    attr = jattri.grad_dot(loss)
    state = attr.cache(p, (b for b in batches(z, (10, 10))))  # reads only the first batch
    assert state.train is None
    with pytest.raises(ValueError, match="`train` is required"):
        attr.attribute(state, test)
    gen = (b for b in batches(z, (10, 10)))
    got = attr.attribute(state, test, train=gen)
    np.testing.assert_allclose(got, grads(p, loss, z) @ grads(p, loss, test).T, rtol=1e-12)
    with pytest.raises(ValueError, match="one-shot"):
        attr.attribute(state, test, train=gen)
    trak = jattri.trak(loss, proj_dim=4)
    gen = (b for b in batches(z, (10, 10)))
    trak.cache(p, gen)
    with pytest.raises(ValueError, match="one-shot"):
        trak.cache(p, gen)


def test_streamed_state_scores_with_train_given():
    p, train, test = params(0), data(1, 20), data(2, 3)
    attr = jattri.grad_dot(jattri.Task(loss, target))
    ref = grads(p, loss, train) @ grads(p, target, test).T
    state = attr.cache(p, jattri.stream(lambda: iter(batches(train, (5, 15)))))
    got = attr.attribute(state, test, train=jattri.stream(batches(train, (11, 9))))
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    self_ref = np.sum(grads(p, loss, train) * grads(p, target, train), 1)
    np.testing.assert_allclose(attr.self_attribute(state, train=jattri.stream(
        batches(train, (20,)))), self_ref, rtol=1e-12)


def test_empty_stream_and_bad_batches():
    attr = jattri.grad_dot(loss)
    with pytest.raises(ValueError, match="no batches"):
        attr.cache(params(0), jattri.stream([]))
    bad = [data(1, 4), (jnp.ones((3, 5)), jnp.zeros((2,), jnp.int32))]
    with pytest.raises(ValueError, match="batch 1"):
        jattri.trak(loss, proj_dim=4).cache(params(0), jattri.stream(bad))


# ----------------------------------------------------------------------------- top-k

@pytest.mark.parametrize("make", [lambda: jattri.grad_dot(loss),
                                  lambda: jattri.trak(loss, proj_dim=8, chunk_size=6)])
def test_top_k_equals_sorted_dense(make):
    p, train, test = params(0), data(1, 37), data(2, 5)
    attr = make()
    state = attr.cache(p, train)
    dense = np.asarray(attr.attribute(state, test))
    top = attr.attribute(state, test, top_k=4, lowest=True)
    assert_top_k_matches_dense(top, dense, 4)
    assert attr.attribute(state, test, top_k=3).lowest_indices is None


def test_top_k_argument_errors():
    attr = jattri.grad_dot(loss)
    state = attr.cache(params(0), data(1, 6))
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="top_k"):
            attr.attribute(state, data(2, 2), top_k=bad)
    with pytest.raises(ValueError, match="exceeds the number of training examples 6"):
        attr.attribute(state, data(2, 2), top_k=7)


def test_chunk_size_argument_errors():
    for bad in (0, -3, True, 1.5, "8"):
        with pytest.raises(ValueError, match="chunk_size"):
            jattri.tracin(loss, chunk_size=bad)


def test_default_chunk_size_from_memory_budget():
    assert engine.default_chunk_size(4 * 10, n=50) == 50
    assert engine.default_chunk_size(4 * 10_700_000) == engine.DEFAULT_CHUNK_BYTES // (
        4 * 10_700_000)
    assert engine.default_chunk_size(4 * 10**10) == 1


@pytest.mark.parametrize("n", [1, 7, 5000, 5001, 10_000, 20_000, 123_457])
@pytest.mark.parametrize("floats", [10, 7_850, 109_386, 10_700_000])
def test_default_chunks_are_balanced(n, floats):
    """With n known: the fewest chunks the budget and the cap allow, as equal as can
    be, so padding is under one row per chunk (5,000 examples: one chunk of 5,000,
    never two of 4,096)."""
    cap = min(engine.MAX_DEFAULT_CHUNK, max(1, engine.DEFAULT_CHUNK_BYTES // (4 * floats)))
    size = engine.default_chunk_size(4 * floats, n)
    chunks = -(-n // size)
    assert size <= cap and chunks == -(-n // cap)
    assert chunks * size - n < chunks


@pytest.mark.parametrize("d, n, blocked", [
    (7_850, 5_000, 1_000),      # dattri's LR: 5 chunks of 1,000 (31 MB each)
    (7_850, 800, None),         # fewer examples than a cache-sized block
    (650, 5_000, None),         # the whole set fits the cache already
    (109_386, 5_000, None)])    # a block of 1,024 would not fit: the budget's chunks
def test_dense_projection_chunks_are_cache_sized_on_cpu(d, n, blocked):
    """A step that forms and densely projects a chunk's gradients keeps the block
    within CACHE_BLOCK_BYTES where that holds CACHE_BLOCK_MIN_ROWS examples or more
    (jattri.methods._common.chunk_size_for); elsewhere (None) the memory budget's
    chunks stay; a chunk_size the user gives is kept."""
    from jattri.methods import _common
    members = _common.as_members({"w": jnp.zeros(d, jnp.float32)})
    x = jnp.zeros((n, 1))
    plain = engine.default_chunk_size(4 * d // _common.PROJECTED_CHUNK_FACTOR, n)
    assert _common.chunk_size_for(None, members, x, projected=True) == plain
    assert _common.chunk_size_for(None, members, x, projected=True, blocked=True) == (
        plain if blocked is None else blocked)
    assert _common.chunk_size_for(300, members, x, projected=True, blocked=True) == 300


def test_cache_sized_chunks_give_the_scores_of_one_chunk(monkeypatch):
    """Dense TRAK on a 7,850-parameter LR, 2,200 examples: its training scan runs in 3
    cache-sized chunks (of 734) by default, with the scores of one chunk of 2,200."""
    train, test = data(3, 2_200, d=784, c=10), data(4, 6, d=784, c=10)
    p = params(3, d=784, c=10)
    sizes = []
    scan = engine.scan
    monkeypatch.setattr(engine, "scan", lambda *a, **k: sizes.append(a[5]) or scan(*a, **k))
    attr = jattri.trak(loss, proj_dim=16, projection="gaussian", damping=0.1)
    state = attr.cache(p, train)
    assert sizes == [734]  # the training scan
    blocked = attr.attribute(state, test)
    one = jattri.trak(loss, proj_dim=16, projection="gaussian", damping=0.1, chunk_size=2_200)
    whole = one.attribute(one.cache(p, train), test)
    np.testing.assert_allclose(blocked, whole, rtol=1e-9, atol=1e-12)


def test_jit_attribute_compiles_once_across_checkpoints():
    """One compiled ``attribute`` serves any checkpoint of the architecture."""
    train, test = data(1, 16), data(2, 3)
    attr = jattri.trak(loss, proj_dim=8)
    states = [attr.cache(params(s), train) for s in (0, 1)]
    fn = jax.jit(attr.attribute)
    out = [fn(s, test) for s in states]
    assert fn._cache_size() == 1
    np.testing.assert_allclose(out[1], attr.attribute(states[1], test), rtol=1e-10)
    assert not np.allclose(out[0], out[1])


def test_chunk_budget_from_the_environment():
    """``JATTRI_CHUNK_BYTES`` sets the default chunk budget; a bad value is refused at
    import with a message naming it."""
    import os
    import subprocess
    import sys
    code = "from jattri import engine; print(engine.DEFAULT_CHUNK_BYTES)"
    env = dict(os.environ, JATTRI_CHUNK_BYTES="4096", JATTRI_COMPILE_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "4096"
    env["JATTRI_CHUNK_BYTES"] = "1e9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "JATTRI_CHUNK_BYTES must be a positive number" in out.stderr


def test_progress_reports_each_stage_and_is_silent_otherwise():
    train, test = data(1, 23), data(2, 4)
    attr = jattri.trak(loss, proj_dim=4, chunk_size=5)
    seen = []

    def report(p, final=False):
        seen.append((p.stage, p.done, p.total, final))

    with jattri.progress(report):
        state = attr.cache(params(0), train)
        attr.attribute(state, test)
        attr.cache(params(0), jattri.stream([jax.tree_util.tree_map(lambda x: x[:11], train),
                                             jax.tree_util.tree_map(lambda x: x[11:], train)]))
    stages = {}
    for stage, done, total, final in seen:
        stages.setdefault((stage, total), []).append((done, final))
    # in memory: every chunk of 5 reported (the last one capped at n), then one final call
    assert stages[("cache", 23)] == [(5, False), (10, False), (15, False), (20, False),
                                     (23, False), (23, True)]
    assert stages[("score", 23)][-1] == (23, True)
    assert stages[("cache", None)][-1] == (23, True)  # the stream: total unknown
    # nothing outside the block, and nothing from inside an enclosing jit
    seen.clear()
    attr.cache(params(0), train)
    with jattri.progress(report):
        jax.jit(attr.attribute)(state, test)
    assert seen == []


@pytest.mark.parametrize("n", [23, 25, 4])
def test_progress_gives_the_quiet_results(n):
    """Inside ``progress`` an in-memory stage of several chunks runs one program per
    chunk, the last overlapping the one before it (n = 23 in chunks of 5: rows 18-22,
    of which 18 and 19 are marked not valid), its outputs written into donated buffers;
    the carry sums (TRAK's Gram), the per-example rows (its features), the dense scores
    and the tiled top-k all equal the quiet run's. One chunk (n = 4) runs the quiet
    program and reports once."""
    train, test = data(1, n), data(2, 4)
    attr = jattri.trak(loss, proj_dim=4, chunk_size=5)
    quiet = attr.cache(params(0), train)
    seen = []
    with jattri.progress(lambda p, final=False: seen.append((p.stage, p.done, final))):
        state = attr.cache(params(0), train)
        scores = attr.attribute(state, test)
        top = attr.attribute(state, test, top_k=3, lowest=True)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(quiet)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scores, attr.attribute(quiet, test), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(top.indices, attr.attribute(quiet, test, top_k=3).indices)
    assert_top_k_matches_dense(top, scores, 3)
    cache = [done for stage, done, final in seen if stage == "cache" and not final]
    assert cache == ([4] if n == 4 else list(range(5, n, 5)) + [n])


_REPORTED = """
import contextlib, json, sys
import jax, jax.numpy as jnp, numpy as np
import jattri
from jattri import _program_cache
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(1)
    if event == "/jax/core/compile/backend_compile_duration" else None)
def loss(p, z):
    return -jax.nn.log_softmax(z[0] @ p["w"])[z[1]]
rng = np.random.default_rng(0)
train = (rng.standard_normal((40, 6)).astype(np.float32), rng.integers(0, 3, 40))
test = (rng.standard_normal((7, 6)).astype(np.float32), rng.integers(0, 3, 7))
p = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}
reports = []
with (jattri.progress(lambda r, final=False: reports.append(r.done))
      if sys.argv[1] == "progress" else contextlib.nullcontext()):
    for attr in (jattri.trak(loss, proj_dim=8, chunk_size=8),
                 jattri.grad_dot(loss, chunk_size=8),
                 jattri.influence_lissa(loss, damping=0.1, depth=12, batch_size=10,
                                        chunk_size=4),
                 jattri.influence_arnoldi(loss, rank=3, num_iters=8, damping=0.1)):
        scores = attr.attribute(attr.cache(p, train), test, top_k=2)
    # Arnoldi's generic route: the mean gradient linearized once, passed to each segment
    q = {"w": p["w"], "v": jnp.eye(3, dtype=jnp.float32)}
    two = lambda q, z: -jax.nn.log_softmax(jnp.tanh(z[0] @ q["w"]) @ q["v"])[z[1]]
    attr = jattri.influence_arnoldi(two, rank=3, num_iters=8, damping=0.1)
    scores = attr.attribute(attr.cache(q, train), test, top_k=2)
print("RESULT" + json.dumps({"compiles": len(compiles), "reports": len(reports),
                             "compiled": _program_cache.stats["compiled"]}))
"""


def test_programs_run_inside_progress_are_stored(tmp_path):
    """Programs run inside ``progress`` carry no host callback, so the persistent
    caches store them: a second process, reporting as the first did, compiles no more
    than a second quiet process does (here fewer). (A scan reporting through ``jax.debug.callback``
    was compiled again in every process: the benchmark CLI, which reports, never
    started warm; so were LiSSA's recursion and Arnoldi's fit, reporting their steps,
    until 2026-12-07.) JAX counts a program read back from its cache as a compilation too,
    and two small programs of this script are compiled in every process, reporting or
    not: hence the comparison with the quiet process."""
    import json
    import os
    import subprocess
    import sys
    script = tmp_path / "reported.py"
    script.write_text(_REPORTED)
    env = dict(os.environ, JATTRI_COMPILE_CACHE=str(tmp_path / "xla"))
    runs = []
    for mode in ("quiet", "quiet", "progress", "progress"):
        done = subprocess.run([sys.executable, str(script), mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        (line,) = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
        runs.append(json.loads(line[len("RESULT"):]))
    quiet, loud, loud_again = runs[1], runs[2], runs[3]
    assert loud["compiles"] > quiet["compiles"] and loud["reports"] >= 10
    assert loud_again["reports"] == loud["reports"]
    assert loud_again["compiles"] <= quiet["compiles"], (quiet, loud_again)
    assert loud_again["compiled"] <= quiet["compiled"], (quiet, loud_again)

"""jattri's programs found again from their jaxpr (:mod:`jattri._program_cache`).

In-process tests point the cache at a temporary directory and use their own jitted
functions (jattri's module-level programs keep what they compile); one test runs a
method in fresh processes, as a user's second script would."""
import json
import os
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jattri import _jit, _program_cache


@pytest.fixture
def store(tmp_path, monkeypatch):
    where = tmp_path / "programs"
    monkeypatch.setattr(_program_cache, "directory", lambda: where)
    before = dict(_program_cache.stats)
    counts = lambda keys=("loaded", "compiled", "stored"): {
        k: _program_cache.stats[k] - before[k] for k in keys}
    return where, counts


def _scaled(x, w, k):
    return jnp.tanh(x @ w) * k + jnp.sum(x[:, 1:3], axis=1, keepdims=True)


def test_stored_then_loaded_equal_to_jax_jit(store):
    where, counts = store
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)
    expected = jax.jit(_scaled, static_argnames="k")(x, w, k=2)

    f = _jit.jit(_scaled, static_argnames="k")
    np.testing.assert_array_equal(f(x, w, k=2), expected)
    np.testing.assert_array_equal(f(x, w, k=2), expected)  # kept: no second compile
    assert counts() == {"loaded": 0, "compiled": 1, "stored": 1}
    assert len(list(where.iterdir())) == 1

    # a new program each: a static value, a shape; the static argument given by
    # position is a new signature with the same program, read back
    f(x, w, k=3)
    f(x[:5], w, k=2)
    np.testing.assert_array_equal(f(x, w, 3), f(x, w, k=3))
    assert counts() == {"loaded": 1, "compiled": 3, "stored": 3}
    assert f._cache_size() == 4

    jax.clear_caches()  # forgets them in this process: the next call reads one back
    f(x, w, k=2)
    assert counts()["loaded"] == 2 and f._cache_size() == 1
    # a fresh function object (a new process's): read back, not compiled
    g = _jit.jit(_scaled, static_argnames="k")
    np.testing.assert_array_equal(g(x, w, k=2), expected)
    np.testing.assert_array_equal(g(np.asarray(x), np.asarray(w), k=2), expected)
    assert counts()["loaded"] == 4 and counts()["compiled"] == 3


def test_another_computation_under_the_same_names_is_not_a_hit(store):
    """Same name, shapes and tree (a Partial's function prints without its address):
    the jaxpr tells them apart."""
    _, counts = store
    x = jnp.arange(3.0)
    apply = _jit.jit(lambda fn, x: fn(x))
    twice = jax.tree_util.Partial(lambda v: v * 2.0)
    thrice = jax.tree_util.Partial(lambda v: v * 3.0)
    np.testing.assert_array_equal(apply(twice, x), x * 2.0)
    fresh = _jit.jit(lambda fn, x: fn(x))
    np.testing.assert_array_equal(fresh(thrice, x), x * 3.0)
    assert counts()["loaded"] == 0 and counts()["compiled"] == 2


def test_a_broken_entry_is_removed_and_compiled(store):
    where, counts = store
    x = jnp.arange(4.0)
    _jit.jit(lambda v: jnp.cumsum(v) ** 2)(x)
    (entry,) = where.iterdir()
    entry.write_bytes(b"not an executable")
    out = _jit.jit(lambda v: jnp.cumsum(v) ** 2)(x)
    np.testing.assert_allclose(out, np.cumsum(np.arange(4.0)) ** 2)
    assert counts() == {"loaded": 0, "compiled": 2, "stored": 2}
    assert entry.read_bytes() != b"not an executable"


def test_programs_that_cannot_be_stored_still_run(store):
    where, counts = store
    x = jnp.arange(4.0)
    seen = []
    with_callback = _jit.jit(lambda v: (jax.debug.callback(seen.append, v), v * 2)[1])
    np.testing.assert_array_equal(with_callback(x), x * 2)
    jax.effects_barrier()
    assert len(seen) == 1
    host = _jit.jit(lambda v: jax.pure_callback(lambda a: np.asarray(a) + 1,
                                                jax.ShapeDtypeStruct(v.shape, v.dtype), v))
    np.testing.assert_array_equal(host(x), x + 1)
    assert counts() == {"loaded": 0, "compiled": 2, "stored": 0}
    assert not where.exists() or not list(where.iterdir())


def test_only_lapack_custom_calls_are_stored(store, tmp_path):
    """A Cholesky (jaxlib's LAPACK, initialised before a program read back runs) is
    stored; an executable calling any other custom call target is not."""
    where, counts = store
    a = jnp.eye(3) * 4.0 + 1.0
    np.testing.assert_allclose(_jit.jit(jnp.linalg.cholesky)(a), np.linalg.cholesky(a),
                               rtol=1e-6)
    assert counts() == {"loaded": 0, "compiled": 1, "stored": 1}

    real = jax.jit(lambda v: v + 1).lower(jnp.arange(3.0)).compile()

    class Other:  # a real executable, as if it called a kernel registered elsewhere
        def __getattr__(self, name):
            return getattr(real, name)

        def as_text(self):
            return 'ROOT %k = f32[3]{0} custom-call(%a), custom_call_target="my_kernel"'

    path = tmp_path / "entry"
    assert _program_cache._store(tmp_path / "plain", real, None)  # (serializable)
    assert not _program_cache._store(path, Other(), None) and not path.exists()


def test_a_program_that_cannot_be_keyed_still_runs(store, monkeypatch):
    _, counts = store
    def unreadable(*args):
        raise ValueError("no digest")
    monkeypatch.setattr(_program_cache, "key", unreadable)
    np.testing.assert_array_equal(_jit.jit(lambda v: v * 3)(jnp.arange(3.0)),
                                  np.arange(3.0) * 3)
    assert counts() == {"loaded": 0, "compiled": 1, "stored": 0}


def test_closed_over_constants_are_part_of_the_key(store):
    _, counts = store
    x = jnp.arange(4.0)
    for scale in (10.0, 20.0, 10.0):
        table = jnp.arange(4.0) * scale  # a constant of the jaxpr, its values hashed
        np.testing.assert_array_equal(_jit.jit(lambda v: v + table)(x), x + table)
    assert counts() == {"loaded": 1, "compiled": 2, "stored": 2}


def test_inside_a_trace_the_program_is_plain_jit(store):
    _, counts = store
    f = _jit.jit(lambda v: jnp.sin(v) * 3)
    out = jax.jit(lambda v: f(v) + 1)(jnp.arange(3.0))
    np.testing.assert_allclose(out, np.sin(np.arange(3.0)) * 3 + 1, rtol=1e-6)
    assert counts()["compiled"] == 0


def _traced(counter):
    def program(x, *, power):
        counter.append(1)  # runs when traced
        return jnp.sum(x ** power, axis=0)
    return program


def test_closed_programs_are_found_without_tracing(store):
    where, counts = store
    x = jnp.arange(6.0).reshape(3, 2)
    traces = []
    f = _jit.jit(_traced(traces), static_argnames="power", closed=True)
    np.testing.assert_array_equal(f(x, power=2), np.sum(np.asarray(x) ** 2, axis=0))
    assert len(traces) == 1 and counts() == {"loaded": 0, "compiled": 1, "stored": 1}
    g = _jit.jit(_traced(traces), static_argnames="power", closed=True)
    np.testing.assert_array_equal(g(x, power=2), f(x, power=2))
    assert len(traces) == 1 and counts()["loaded"] == 1  # not traced again
    g(x, power=3)  # another static value: another program
    g(x[:2], power=2)  # another shape
    assert len(traces) == 3 and counts()["compiled"] == 3
    # a static argument that is not plain data falls back to the traced key: two
    # objects printed alike, which a digest of their repr would confuse
    class Op:
        def __init__(self, fn):
            self.fn = fn

        def __repr__(self):
            return "Op"

    h = _jit.jit(lambda x, op: op.fn(x), static_argnums=1, closed=True)
    np.testing.assert_array_equal(h(x, Op(jnp.cos)), jnp.cos(x))
    fresh = _jit.jit(lambda x, op: op.fn(x), static_argnums=1, closed=True)
    np.testing.assert_allclose(fresh(x, Op(jnp.sin)), jnp.sin(x), rtol=1e-6)
    assert counts()["compiled"] == 5


def test_a_closed_key_covers_jattri_constants_set_at_run_time(monkeypatch):
    import importlib

    rps = importlib.import_module("jattri.methods.rps")  # (the package exports rps())
    x = jnp.ones((3, 2))
    leaves, tree = jax.tree_util.tree_flatten(((x,), {}))
    key = lambda: _program_cache.closed_key(_scaled, None, tree, leaves, None, {})
    before = key()
    assert before is not None and key() == before
    monkeypatch.setattr(rps, "REFIT_BACKTRACKING_STEPS", rps.REFIT_BACKTRACKING_STEPS + 1)
    assert key() != before
    monkeypatch.undo()
    assert key() == before
    partial_tree = jax.tree_util.tree_structure(((jax.tree_util.Partial(jnp.cos), x), {}))
    assert _program_cache.closed_key(_scaled, None, partial_tree, leaves, None, {}) is None


_SCRIPT = textwrap.dedent("""
    import json, sys
    import scipy.linalg  # (before jattri: jaxlib's LAPACK is then initialised otherwise)
    import jax, jax.numpy as jnp, numpy as np
    import jattri
    from jattri import _program_cache

    # a program of the user's first: JAX then decides, once per process, that its
    # persistent cache is used
    jax.jit(lambda v: v + 1)(np.ones(2, np.float32))

    def loss(params, example):
        x, y = example
        logits = jnp.tanh(x @ params["w1"]) @ params["w2"]
        return SCALE * -jax.nn.log_softmax(logits)[y]

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 4)) * 0.5, jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((4, 3)) * 0.5, jnp.float32)}
    data = lambda n, s: (jnp.asarray(np.random.default_rng(s).standard_normal((n, 5)),
                                     jnp.float32),
                         jnp.asarray(np.random.default_rng(s).integers(0, 3, n)))
    out = {}
    rps = jattri.rps(features_fn=lambda p, z: jnp.tanh(z[0] @ p["w1"]),
                     logits_fn=lambda p, z: SCALE * jnp.tanh(z[0] @ p["w1"]) @ p["w2"],
                     label_fn=lambda z: z[1], targets="predictions", l2=1e-2)
    for name, attr in [("trak", jattri.trak(loss, proj_dim=8)),
                       ("arnoldi", jattri.influence_arnoldi(loss)), ("rps", rps)]:
        state = attr.cache(params, data(12, 1))
        out[name] = np.asarray(attr.attribute(state, data(4, 2))).tolist()
        if name == "trak":  # the tiled top-k scan (XLA's TopK custom call)
            out["trak_top"] = np.asarray(attr.attribute(state, data(4, 2), top_k=3,
                                                        lowest=True).indices).tolist()
    out["stats"] = _program_cache.stats
    print("RESULT" + json.dumps(out))
""")


def _run(tmp_path, scale, **env):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.replace("SCALE", repr(scale)))
    full = dict(os.environ, JATTRI_COMPILE_CACHE=str(tmp_path / "cache"))
    full.update(env)
    done = subprocess.run([sys.executable, str(script)], env=full, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
    return json.loads(line[len("RESULT"):])


def test_a_second_process_reads_every_program_back(tmp_path):
    """TRAK (its dense scores and its tiled top-k, whose ``TopK`` custom call is
    stored too), Arnoldi and RPS (whose refit is a ``closed`` program).
    JAX's own cache filled first (the program cache off), then the program cache on:
    an executable JAX read back from its cache serializes without its CPU kernels, so
    those are compiled afresh before they are stored; the third process reads
    everything back and gets the same scores. Programs that call the user's functions
    are found there from those functions' own jaxprs (``opened``), without tracing
    jattri's code; with ``JATTRI_PROGRAM_INDEX=0`` they are traced and found by their
    whole jaxpr. A changed loss (same names, shapes and trees) is not a hit. scipy.linalg is imported first, as scikit-learn does: the
    programs read back run LAPACK (TRAK's solve) without any lowering having handed
    jaxlib its pointers (a segmentation fault before ``_jit.ensure_lapack``). A plain
    ``jax.jit`` program runs first in each process, so JAX has switched its cache on for
    good before jattri compiles anything to store."""
    jax_only = _run(tmp_path, 1.0, JATTRI_PROGRAM_CACHE="0")
    assert jax_only["stats"]["compiled"] == 0
    first = _run(tmp_path, 1.0)
    assert first["stats"]["loaded"] == 0
    assert first["stats"]["stored"] == first["stats"]["compiled"] > 0
    assert first["stats"]["indexed"] > 0  # the programs that call the user's functions
    second = _run(tmp_path, 1.0)
    assert second["stats"] == {"loaded": first["stats"]["compiled"], "compiled": 0,
                               "stored": 0, "opened": first["stats"]["indexed"],
                               "indexed": 0}
    traced = _run(tmp_path, 1.0, JATTRI_PROGRAM_INDEX="0")  # every open program traced
    assert traced["stats"] == dict(second["stats"], opened=0)
    for name in ("trak", "trak_top", "arnoldi", "rps"):
        np.testing.assert_array_equal(second[name], jax_only[name])
        np.testing.assert_array_equal(first[name], jax_only[name])
        np.testing.assert_array_equal(traced[name], jax_only[name])
    changed = _run(tmp_path, 2.0)
    assert changed["stats"]["compiled"] > 0
    # only programs that call none of the changed functions (RPS's features_fn) are
    # found by their user functions
    assert changed["stats"]["opened"] < second["stats"]["opened"]
    reference = _run(tmp_path, 2.0, JATTRI_COMPILE_CACHE="0")
    for name in ("trak", "arnoldi", "rps"):
        np.testing.assert_allclose(changed[name], reference[name], rtol=1e-6, atol=1e-7)
        assert not np.allclose(changed[name], second[name])


_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jattri import _jit, _program_cache
    out = _jit.jit(lambda x: x * 2 + 1)(jnp.arange(3.0))
    assert out.tolist() == [1.0, 3.0, 5.0], out
    print("STATS", _program_cache.stats)
""")


def test_a_program_is_loaded_onto_its_own_devices(tmp_path):
    """With four CPU devices, a one-device program read back in a second process runs
    on its one device (loaded onto every device, it expected four shards of each
    argument: README's sharding example failed so)."""
    script = tmp_path / "devices.py"
    script.write_text(_DEVICES)
    env = dict(os.environ, JATTRI_COMPILE_CACHE=str(tmp_path / "cache"),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    stats = []
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        stats.append([l for l in done.stdout.splitlines() if l.startswith("STATS")][0])
    assert "'stored': 1" in stats[0] and "'loaded': 1" in stats[1]


# ------------------------------------------- programs found by their user functions

def _linear_data():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}
    data = lambda n, s: (jnp.asarray(np.random.default_rng(s).standard_normal((n, 4)),
                                     jnp.float32),
                         jnp.asarray(np.random.default_rng(s).standard_normal((n, 2)),
                                     jnp.float32))
    return params, data(10, 1), data(3, 2)


def _squared(k):
    def loss(params, example):
        x, y = example
        return k * jnp.sum((x @ params["w"] - y) ** 2)
    return loss


def _grad_dot_scores(loss):
    import jattri

    params, train, test = _linear_data()
    attr = jattri.grad_dot(loss)
    return np.asarray(attr.attribute(attr.cache(params, train), test))


_ALL = ("loaded", "compiled", "stored", "opened", "indexed")


def test_a_user_functions_programs_are_found_by_its_jaxpr(store, monkeypatch):
    """Grad-Dot's programs call the user's loss: stored and indexed at the first call;
    after ``jax.clear_caches()`` (a new process, as far as programs go) each is found
    from the loss's own jaxpr, without tracing the program, with the same scores."""
    where, counts = store
    loss = _squared(1.0)
    first = _grad_dot_scores(loss)
    made = counts(_ALL)
    assert made["compiled"] == made["stored"] > 0 and made["indexed"] > 0
    assert len(list(where.glob("u-*"))) == made["indexed"]

    jax.clear_caches()
    traces = []
    watching = _program_cache._watching

    def counted():
        traces.append(1)
        return watching()
    monkeypatch.setattr(_program_cache, "_watching", counted)  # (around each trace)
    again = _grad_dot_scores(loss)
    now = {k: v - made[k] for k, v in counts(_ALL).items()}
    assert now == {"loaded": made["stored"], "compiled": 0, "stored": 0,
                   "opened": made["indexed"], "indexed": 0}
    assert len(traces) == made["stored"] - made["indexed"]  # only the closed ones
    np.testing.assert_array_equal(again, first)


def test_a_changed_user_function_is_traced_again(store):
    """The same program under another loss (same name, shapes and trees; one literal
    changed) renders to the same index entry, but the loss's jaxpr differs at the
    recorded arguments: nothing is found by the index, the programs are compiled anew
    and the scores are the new loss's (4 × the old for Grad-Dot of 2 × the loss)."""
    where, counts = store
    first = _grad_dot_scores(_squared(1.0))
    made = counts(_ALL)
    jax.clear_caches()
    changed = _grad_dot_scores(_squared(2.0))
    now = {k: v - made[k] for k, v in counts(_ALL).items()}
    assert now["opened"] == 0 and now["compiled"] == made["indexed"]
    np.testing.assert_allclose(changed, 4 * first, rtol=1e-5)


@jax.custom_jvp
def _doubled(x):
    return 2 * x


@_doubled.defjvp
def _doubled_jvp(primals, tangents):
    return _doubled(primals[0]), 3 * tangents[0]  # a rule the jaxpr does not show


def test_what_a_jaxpr_cannot_stand_for_is_not_fingerprinted():
    """A user's custom derivative rule prints as "Wrapped function" in a jaxpr, so a
    function calling one has no fingerprint (its programs are traced in every process);
    JAX's own rules (``jax.nn.relu``'s) are part of JAX's version and keep it."""
    spec = ((_program_cache._Aval((3,), "float32", False),), {})
    own = _program_cache._fingerprint(lambda x: jnp.sum(jax.nn.relu(x)), spec)
    assert own is not None and own == _program_cache._fingerprint(
        lambda x: jnp.sum(jax.nn.relu(x)), spec)
    assert _program_cache._fingerprint(lambda x: jnp.sum(jax.nn.relu(x) * 2), spec) != own
    assert _program_cache._fingerprint(lambda x: jnp.sum(_doubled(x)), spec) is None
    # a host callback (an effect), and a function that does not trace alone
    assert _program_cache._fingerprint(
        lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct((3,), jnp.float32), x)
        .sum() + jax.debug.print("{}", x), spec) is None
    assert _program_cache._fingerprint(lambda x: float(x[0]), spec) is None
    # a plain scalar among the arguments is passed as itself, not traced
    scalar = ((_program_cache._Aval((3,), "float32", False), 2), {})
    assert _program_cache._fingerprint(lambda x, k: x[:k].sum(), scalar) is not None


def _raw_loss(params, example):
    return jnp.sum(params * example)


def test_only_renderable_arguments_are_indexed():
    """A user's function reaches an indexed program only as a ``UserFn`` (a numbered
    slot); a bare one, an array or an object of an unknown class among the static
    arguments, or a program that is not jattri's own, is not rendered (traced as
    before). jattri's functions are rendered with what they close over."""
    from jax.tree_util import Partial

    from jattri import engine
    from jattri.func.grads import as_partial

    slots = []
    wrapped = as_partial(_raw_loss)
    tree = jax.tree_util.tree_structure((Partial(engine.token), wrapped))
    text = _program_cache._render_tree(tree, slots, 0)
    assert slots == [wrapped.func] and "user#0" in text and "_raw_loss" not in text
    import dataclasses
    import typing

    Config = dataclasses.make_dataclass("Config", ["k"], frozen=True)  # (this module's)
    Pair = typing.NamedTuple("Pair", [("a", int), ("b", int)])
    from jattri.func.layers import Layer
    assert "Layer(" in _program_cache._render(
        Layer("fc", "dense", 3, 2, True, 1, (3, 2), (((2,), np.dtype("float32")),), None,
              "fc/w", "fc/b"), [])
    for bad in (_raw_loss, np.ones(2), object(), (1, partial(_raw_loss, 1)),
                jax.tree_util.tree_structure(Partial(_raw_loss)), Config(1), Pair(1, 2),
                Config):
        with pytest.raises(_program_cache._Unrenderable):
            _program_cache._render(bad, [])

    def closing(k):
        return lambda x: x * k
    closing.__module__ = closing(1).__module__  # (a test's closure: not jattri's)
    with pytest.raises(_program_cache._Unrenderable):
        _program_cache._render(closing(2), [])

    leaves = [jnp.ones(2)]
    tree = jax.tree_util.tree_structure(leaves)
    assert _program_cache.open_key(_scaled, None, tree, leaves, None, {}) is None
    key = lambda static: _program_cache.open_key(engine.token, static, tree, leaves,
                                                 None, {})
    assert key(((0, 3),)) is not None and key(((0, 3),)) != key(((0, 4),))
    assert key(((0, partial(engine.token)),)) is not None
    assert key(((0, _raw_loss),)) is None


def test_a_user_function_traced_with_constants_is_not_indexed(tmp_path):
    """A call inside a trace with a concrete array (a constant of the program) taints
    the function: programs calling it are not indexed. Calls outside any trace are not
    recorded at all."""
    from jattri.func.grads import as_partial

    held = as_partial(lambda x: jnp.sin(x) * 2)  # (its UserFn refers to the lambda weakly)
    fn = held.func
    fn(jnp.ones(3))  # eager
    assert fn._calls == {} and not fn._tainted
    jax.make_jaxpr(lambda x: fn(x) + 1)(jnp.ones(3))
    assert len(fn._calls) == 1 and not fn._tainted
    assert _program_cache._store_open(tmp_path, "k", [fn], "digest")
    # read back, the entry holds dtypes by name: a numpy dtype read back by pickle is a
    # copy of the builtin one, which JAX's caches would then hand to later traces
    import pickle
    _, [(_, text, spec, fp)] = pickle.loads((tmp_path / "u-k").read_bytes())
    (arg,), _ = spec
    assert isinstance(arg, _program_cache._Aval) and arg.dtype == "float32"
    assert arg.struct().dtype is np.dtype("float32")
    assert _program_cache._fingerprint(fn._fn, spec) == fp == fn.fingerprint(text, spec)
    constant = jnp.ones(3)  # (made outside the trace: concrete inside it)
    jax.make_jaxpr(lambda x: fn(x) + fn(constant))(jnp.ones(3))
    assert fn._tainted
    assert not _program_cache._store_open(tmp_path, "k2", [fn], "digest")
    jax.clear_caches()  # forgets the records, as JAX forgets its traces
    assert fn._calls == {} and not fn._tainted


def test_as_partial_holds_a_users_function_as_user_fn():
    """``as_partial`` wraps functions that are not jattri's in one ``UserFn`` each,
    equal and hashing as the function (jit's caches keyed on it keep hitting), with its
    name and signature; jattri's own functions, and a ``UserFn``, are kept as they are;
    a user's ``Partial`` keeps its bound arguments."""
    import inspect

    from jax.tree_util import Partial

    from jattri import _resume, engine
    from jattri.func.grads import as_partial

    p = as_partial(_raw_loss)
    assert isinstance(p.func, _program_cache.UserFn) and p.func._fn is _raw_loss
    assert p.func == _program_cache.UserFn(_raw_loss)  # (a fresh wrapper of it)
    assert hash(p.func) == hash(_raw_loss) and as_partial(_raw_loss).func is p.func
    assert str(inspect.signature(p.func)) == "(params, example)"
    assert p.func.__name__ == "_raw_loss"
    assert _resume._describe(p) == _resume._describe(Partial(_raw_loss))
    assert as_partial(engine.token).func is engine.token
    bound = as_partial(Partial(_raw_loss, jnp.ones(2)))
    assert bound.func is p.func and len(bound.args) == 1
    np.testing.assert_array_equal(bound(jnp.ones(2) * 3), 6.0)
    assert jax.tree_util.tree_structure(as_partial(_raw_loss)) == \
        jax.tree_util.tree_structure(as_partial(_raw_loss))


class _Held:
    """What a user's closure holds: a model object, a dataset, frozen weights."""


def _closure_over(held):
    def loss_fn(params, example, held=held):
        x, y = example
        return -jax.nn.log_softmax(x @ params["w"])[y]
    return loss_fn


def _lr_data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((24, 5)), jnp.float32)
    y = jnp.asarray(np.arange(24) % 3, jnp.int32)
    return {"w": jnp.asarray(rng.standard_normal((5, 3)) * 0.3, jnp.float32)}, (x, y)


@pytest.mark.parametrize("method", ["grad_dot", "trak"])
def test_a_users_function_goes_with_its_attributor(method):
    """JAX's caches keep the tree structures of every program's arguments for the life
    of the process, and a ``UserFn`` sits in them: it holds the function weakly, so the
    function, and what its closure holds, go once its attributor and state are gone
    (they stayed, 200 MB each time, for a loss closing over 200 MB). While they live,
    the attributor keeps it."""
    import gc
    import weakref

    import jattri

    params, (x, y) = _lr_data()
    held = _Held()
    gone = weakref.ref(held)
    loss_fn = _closure_over(held)
    attr = jattri.grad_dot(loss_fn) if method == "grad_dot" else jattri.trak(loss_fn, proj_dim=4)
    del held, loss_fn
    gc.collect()
    assert gone() is not None  # the attributor's
    state = attr.cache(params, (x, y))
    scores = attr.attribute(state, (x[:3], y[:3]))
    assert scores.shape == (24, 3) and bool(jnp.all(jnp.isfinite(scores)))
    del attr, state, scores
    gc.collect()
    assert gone() is None


def test_an_inline_function_lives_as_long_as_its_attributor():
    """A lambda no one else holds stays alive with the attributor (the Task keeps the
    loss, TRAK's closures its ``prob_fn``), through collections between the stages, and
    the scores are those of the same function held by the caller."""
    import gc

    import jattri

    params, (x, y) = _lr_data()

    def named(p, z):
        return -jax.nn.log_softmax(z[0] @ p["w"])[z[1]]

    def prob(p, z):
        return jax.nn.softmax(z[0] @ p["w"])[z[1]]

    expected = jattri.trak(named, proj_dim=6, prob_fn=prob)
    expected = expected.attribute(expected.cache(params, (x, y)), (x[:4], y[:4]))
    attr = jattri.trak(lambda p, z: -jax.nn.log_softmax(z[0] @ p["w"])[z[1]], proj_dim=6,
                       prob_fn=lambda p, z: jax.nn.softmax(z[0] @ p["w"])[z[1]])
    gc.collect()
    state = attr.cache(params, (x, y))
    gc.collect()
    np.testing.assert_allclose(attr.attribute(state, (x[:4], y[:4])), expected, rtol=1e-6)


def test_as_partial_keeps_the_function_it_wraps():
    """The ``UserFn`` holds the function weakly; the ``Partial`` that ``as_partial``
    returns holds it, so a lambda given only to it stays callable, also through jit."""
    import gc

    from jattri.func.grads import as_partial

    p = as_partial(lambda v: v * 2.0)
    gc.collect()
    np.testing.assert_allclose(p(3.0), 6.0)
    np.testing.assert_allclose(jax.jit(lambda q, v: q(v))(p, 4.0), 8.0)
    bound = as_partial(Partial(lambda a, v: a * v, jnp.asarray(5.0)))
    gc.collect()
    np.testing.assert_allclose(bound(2.0), 10.0)


def test_a_user_fn_whose_function_is_gone():
    """Equal only to itself, its hash kept, its name in its repr, and a call says what
    happened (a program of it is never called again: no one holds it)."""
    import gc

    held = _Held()
    fn = _program_cache.UserFn(_closure_over(held))
    other = _program_cache.UserFn(_closure_over(held))
    h = hash(fn)
    gc.collect()
    assert fn == fn and fn != other and hash(fn) == h and "loss_fn" in repr(fn)
    with pytest.raises(RuntimeError, match="garbage-collected"):
        fn({"w": jnp.ones((5, 3))}, (jnp.ones(5), 0))


class _NoWeakRef:
    __slots__ = ()

    def __call__(self, params, example):
        return jnp.sum(params["w"]) * example


def test_a_function_without_weak_references_is_held():
    """A callable that takes no weak reference is held by its ``UserFn``, as before,
    and one ``UserFn`` stands for it."""
    from jattri.func.grads import as_partial

    fn = _NoWeakRef()
    p = as_partial(fn)
    assert isinstance(p.func, _program_cache.UserFn) and p.func._fn is fn
    assert as_partial(fn).func is p.func
    np.testing.assert_allclose(p({"w": jnp.ones(2)}, 3.0), 6.0)


def test_constants_a_closure_uses_go_with_jax_clear_caches():
    """Arrays a function's closure uses inside the trace are constants of the programs,
    which JAX's caches keep; ``jax.clear_caches()`` lets them go (passed as arguments,
    ``Partial(fn, arrays)``, they are never constants)."""
    import gc
    import weakref

    import jattri

    params, (x, y) = _lr_data()
    shift = jnp.arange(3.0, dtype=jnp.float32)
    gone = weakref.ref(shift)

    def loss_fn(p, z):
        return -jax.nn.log_softmax(z[0] @ p["w"] + shift)[z[1]]

    attr = jattri.grad_dot(loss_fn)
    attr.attribute(attr.cache(params, (x, y)), (x[:2], y[:2])).block_until_ready()
    del attr, loss_fn, shift
    jax.clear_caches()
    gc.collect()
    assert gone() is None


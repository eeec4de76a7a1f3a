"""Params are data, never constants (issue 10): for every method,

* ``jax.jit(attr.attribute)`` (and ``cache``, ``self_attribute``) called on two
  different checkpoints of one architecture compiles once, and the second call runs no
  XLA compilation at all;
* ensemble members that differ only in arrays (dropout keys, LoRA adapters, another
  checkpoint) share every compiled program: a second ensemble of the same size compiles
  nothing; a larger one compiles only for its new shapes;
* ``jax.make_jaxpr`` of ``cache``, ``attribute`` and ``self_attribute`` on a model of
  103,427 parameters holds no constant with more than 10,000 elements (consts of every
  nested jaxpr and array literals included).

Compilations are counted by jax's own monitoring event for backend compiles
(``/jax/core/compile/backend_compile_duration``, one per XLA compilation) and by the
jitted stage's ``_cache_size()``.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jattri
from jattri.ensemble import dropout, dropout_trak, lora
from jattri.models import MLP as MLPModule
from _jaxprs import nested
from test_ensemble import init_mlp, mlp_data, mlp_features, mlp_logits, mlp_loss, pending

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
MAX_CONST = 10_000


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block (``.n``)."""
    class Counter:
        n = 0

    counter = Counter()

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            counter.n += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# ---------------------------------------------------------------- the methods

def small_logits(params, example):
    return mlp_logits(params, example[0])


def label(example):
    return example[1]


def _rps(task, logits):
    # module-level functions: a new lambda per call would be a new function (new code)
    return jattri.rps(task, features_fn=mlp_features, logits_fn=logits, label_fn=label,
                      l2=1e-2)


# name -> (task, logits_fn(params, example)) -> Attributor; small hyperparameters: only
# programs are counted
METHODS = {
    "grad_dot": lambda t, lg: jattri.grad_dot(t),
    "grad_cos": lambda t, lg: jattri.grad_cos(t),
    "tracin": lambda t, lg: jattri.tracin(t),
    "tracin_sjlt": lambda t, lg: jattri.tracin(t, proj_dim=8, projection="sjlt"),
    "trak": lambda t, lg: jattri.trak(t, proj_dim=8),
    "dropout_trak": lambda t, lg: dropout_trak(t, 2, jax.random.PRNGKey(7), proj_dim=8),
    "influence_explicit": lambda t, lg: jattri.influence_explicit(t, damping=1.0),
    "influence_cg": lambda t, lg: jattri.influence_cg(t, damping=1.0, maxiter=5),
    "influence_lissa": lambda t, lg: jattri.influence_lissa(t, damping=1.0, depth=5),
    "influence_arnoldi": lambda t, lg: jattri.influence_arnoldi(t, rank=4, damping=1.0),
    "influence_ekfac": lambda t, lg: jattri.influence_ekfac(t, damping=0.1),
    "influence_datainf": lambda t, lg: jattri.influence_datainf(t),
    "logra": lambda t, lg: jattri.logra(t, proj_dim_in=3, proj_dim_out=2),
    "rps": lambda t, lg: _rps(t, lg),
    "knn_shapley": lambda t, lg: jattri.knn_shapley(3, features_fn=mlp_features),
}


def test_every_exported_method_is_covered():
    exported = {n for n in jattri.methods.__all__ if n != "Attributor"}
    assert exported <= set(METHODS), exported - set(METHODS)


# ------------------------------------------------- one compile across checkpoints

@pytest.mark.parametrize("name", sorted(METHODS))
def test_jitted_stages_compile_once_across_checkpoints(name):
    with pending(name):
        _compile_once_across_checkpoints(name)


def _compile_once_across_checkpoints(name):
    p1, p2 = init_mlp(jax.random.PRNGKey(0)), init_mlp(jax.random.PRNGKey(1))
    train, test = mlp_data(jax.random.PRNGKey(2), 12), mlp_data(jax.random.PRNGKey(3), 3)
    attr = METHODS[name](jattri.Task(mlp_loss), small_logits)

    cache = jax.jit(attr.cache)
    s1 = cache(jattri.checkpoints([p1]), train)
    with count_compiles() as c:
        s2 = cache(jattri.checkpoints([p2]), train)
    assert cache._cache_size() == 1 and c.n == 0, f"{name}: cache compiled again"

    attribute = jax.jit(attr.attribute)
    r1 = attribute(s1, test)
    with count_compiles() as c:
        r2 = attribute(s2, test)
    assert attribute._cache_size() == 1 and c.n == 0, f"{name}: attribute compiled again"
    assert r2.shape == (12, 3) and bool(jnp.all(jnp.isfinite(r2)))
    assert not np.allclose(r1, r2)  # the second checkpoint was really used
    np.testing.assert_allclose(r2, attr.attribute(attr.cache(p2, train), test),
                               rtol=2e-4, atol=1e-6)

    self_attribute = jax.jit(attr.self_attribute)
    self_attribute(s1)
    with count_compiles() as c:
        v2 = self_attribute(s2)
    assert self_attribute._cache_size() == 1 and c.n == 0, \
        f"{name}: self_attribute compiled again"
    assert v2.shape == (12,)


# ------------------------------------------------------ ensembles share programs

@pytest.mark.parametrize("name", sorted(set(METHODS) - {"dropout_trak"}))  # its own masks
def test_dropout_members_share_compilations(name):
    with pending(name):
        _dropout_members_share(name)


def _dropout_members_share(name):
    params, other = init_mlp(jax.random.PRNGKey(0)), init_mlp(jax.random.PRNGKey(1))
    train, test = mlp_data(jax.random.PRNGKey(2), 12), mlp_data(jax.random.PRNGKey(3), 3)
    task = jattri.Task(mlp_loss)
    one = dropout(task, params, 1, jax.random.PRNGKey(3))
    three = dropout(task, params, 3, jax.random.PRNGKey(4))
    again = [dropout(task, params, 3, jax.random.PRNGKey(5)),  # other masks
             dropout(task, other, 3, jax.random.PRNGKey(4))]   # another checkpoint
    attr = METHODS[name](one[0], small_logits)  # one Task serves every dropout ensemble

    # eager stages (jattri's own jitted steps inside)
    attr.attribute(attr.cache(three[1], train), test)
    for ens_task, members in again:
        a = METHODS[name](ens_task, small_logits)
        with count_compiles() as c:
            scores = a.attribute(a.cache(members, train), test)
        assert c.n == 0, f"{name}: a dropout ensemble of the same size compiled {c.n} programs"
        assert scores.shape == (12, 3) and bool(jnp.all(jnp.isfinite(scores)))

    # a jitted stage: 1 member, then 3 (new shapes: one compile), then 3 others (none)
    cache, attribute = jax.jit(attr.cache), jax.jit(attr.attribute)
    for k, (_, members) in enumerate([one, three] + again):
        attribute(cache(members, train), test)
        sizes = (cache._cache_size(), attribute._cache_size())
        assert sizes == ((1, 1) if k == 0 else (2, 2)), f"{name}: {sizes} after {k + 1}"


def test_lora_adapters_share_compilations():
    params = init_mlp(jax.random.PRNGKey(0))
    train, test = mlp_data(jax.random.PRNGKey(1), 12), mlp_data(jax.random.PRNGKey(2), 3)
    task = jattri.Task(mlp_loss)
    ensembles = [lora(task, params, train, 3, jax.random.PRNGKey(k), rank=2, steps=3,
                      batch_size=4)[:2] for k in (1, 2)]
    ensembles.append(lora(task, init_mlp(jax.random.PRNGKey(5)), train, 3,
                          jax.random.PRNGKey(1), rank=2, steps=3, batch_size=4)[:2])
    for k, (ens_task, members) in enumerate(ensembles):
        attr = jattri.trak(ens_task, proj_dim=8)
        with count_compiles() as c:
            attr.attribute(attr.cache(members, train), test)
        if k:
            assert c.n == 0, f"LoRA ensemble {k} compiled {c.n} programs"


class _UnhashableLoss:
    """A callable loss holding an array, with value equality: not hashable."""

    def __init__(self, scale):
        self.scale = scale

    def __eq__(self, other):
        return isinstance(other, _UnhashableLoss) and bool(jnp.all(self.scale == other.scale))

    __hash__ = None

    def __call__(self, params, example, rng=None):
        return self.scale * mlp_loss(params, example, rng)


@pytest.mark.usefixtures("x64")
def test_unhashable_loss_functions_work_uncached():
    params = init_mlp(jax.random.PRNGKey(0))
    train, test = mlp_data(jax.random.PRNGKey(1), 8), mlp_data(jax.random.PRNGKey(2), 2)
    loss = _UnhashableLoss(jnp.asarray(2.0))
    same = lambda p, z, rng=None: 2.0 * mlp_loss(p, z, rng)  # hashable twin
    key = jax.random.PRNGKey(0)
    for build in (lambda f: (jattri.Task(f), jattri.checkpoints([params])),
                  lambda f: dropout(jattri.Task(f), params, 2, key)):
        (t1, m1), (t2, m2) = build(loss), build(same)
        got, want = jattri.grad_dot(t1), jattri.grad_dot(t2)
        np.testing.assert_allclose(got.attribute(got.cache(m1, train), test),
                                   want.attribute(want.cache(m2, train), test), rtol=1e-12)


@pytest.mark.usefixtures("x64")
def test_func_level_solvers_compile_once_for_one_function():
    """``ihvp_explicit`` / ``ihvp_cg`` / ``ihvp_arnoldi`` / ``ihvp_lissa`` called again
    with the same ``f`` (other params values and vectors) compile nothing."""
    from jattri import func
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 3))
    f = lambda p: jnp.mean((x @ p["w"] - 1.0) ** 2) + 0.5 * jnp.sum(p["w"] ** 2)
    f_batch = lambda p, b: jnp.mean((b @ p["w"] - 1.0) ** 2) + 0.5 * jnp.sum(p["w"] ** 2)
    calls = [
        lambda p, v: func.ihvp_explicit(f, p, v, damping=0.1),
        lambda p, v: func.ihvp_cg(f, p, v, damping=0.1),
        lambda p, v: func.ihvp_arnoldi(f, p, v, rank=3, damping=0.1),
        lambda p, v: func.ihvp_lissa(f_batch, p, v, data=x, key=jax.random.PRNGKey(1),
                                     damping=0.1, depth=20),
    ]
    for call in calls:
        call({"w": jnp.ones(3)}, {"w": jnp.ones(3)})
    p, v = {"w": jnp.arange(3.0)}, {"w": jnp.arange(3.0) - 1.0}  # (eager ops compile)
    with count_compiles() as c:
        outs = [call(p, v) for call in calls]
    assert c.n == 0
    for out in outs:
        assert bool(jnp.all(jnp.isfinite(out["w"])))


# --------------------------------------------- no parameter-sized constants

BIG = MLPModule(hidden=(256,), num_classes=3, dropout_rate=0.3)
BIG_IN = 400  # 400·256 + 256 + 256·3 + 3 = 103,427 parameters


def big_logits(params, x, rng=None):
    if rng is None:
        return BIG.apply({"params": params}, x[None])[0]
    return BIG.apply({"params": params}, x[None], deterministic=False,
                     rngs={"dropout": rng})[0]


def big_example_logits(params, example):
    return big_logits(params, example[0])


def big_loss(params, example, rng=None):
    x, y = example
    return optax.softmax_cross_entropy_with_integer_labels(big_logits(params, x, rng), y)


def _sizes_of_constants(closed) -> list:
    """Element counts of every constant of a ClosedJaxpr: its consts, array literals
    among equation inputs, and the same in every nested jaxpr (scan/while/cond/pjit
    bodies, custom derivatives)."""
    from jax.extend import core as jcore
    found = []
    for jaxpr, consts in nested(closed):
        found.extend(int(np.size(c)) for c in consts)
        found.extend(int(np.size(v.val)) for eqn in jaxpr.eqns for v in eqn.invars
                     if isinstance(v, jcore.Literal))
    return found


def test_constant_inspection_finds_closed_over_params():
    """The inspection itself: a closed-over array inside a scan inside a jit is found."""
    w = jnp.ones((200, 100))

    def f(x):
        inner = jax.jit(lambda y: jax.lax.scan(lambda c, r: (c + jnp.sum(w @ r), None),
                                               0.0, y)[0])
        return inner(x)

    assert max(_sizes_of_constants(jax.make_jaxpr(f)(jnp.ones((3, 100))))) == 20_000
    assert max(_sizes_of_constants(jax.make_jaxpr(lambda w, x: jnp.sum(w @ x[0]))(
        w, jnp.ones((3, 100)))), default=0) < MAX_CONST


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_parameter_sized_constants(name):
    with pending(name):
        _no_parameter_sized_constants(name)


def _no_parameter_sized_constants(name):
    params = BIG.init(jax.random.PRNGKey(0), jnp.zeros((1, BIG_IN)))["params"]
    d = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    assert d >= 100_000
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x, y = jax.random.normal(kx, (10, BIG_IN)), jax.random.randint(ky, (10,), 0, 3)
    train, test = (x[:6], y[:6]), (x[6:], y[6:])
    members = jattri.checkpoints([params])
    attr = METHODS[name](jattri.Task(big_loss), big_example_logits)

    stages = {"cache": jax.make_jaxpr(attr.cache)(members, train)}
    if name == "influence_explicit":
        # A dense (d, d) Hessian of 103,427 parameters (43 GB) is never computed: the
        # state is abstract (jax.eval_shape), its stages only traced.
        state = jax.eval_shape(attr.cache, members, train)
    else:
        state = attr.cache(members, train)
    stages["attribute"] = jax.make_jaxpr(attr.attribute)(state, test)
    stages["self_attribute"] = jax.make_jaxpr(attr.self_attribute)(state)
    for stage, closed in stages.items():
        biggest = max(_sizes_of_constants(closed), default=0)
        assert biggest <= MAX_CONST, \
            f"{name}.{stage}: a constant of {biggest} elements (model: {d} parameters)"


# ------------------------------------------------------ no eager op on a first call

def _eager(name: str) -> bool:
    """A program compiled for one eager jax operation: a jax.numpy / lax / random
    function called outside any jit (``_reduce_all`` is ``jnp.all``, ``_threefry_*``
    the key functions), or ``jnp.asarray`` of a host array (``stage``)."""
    return (name == "stage" or name.startswith(("_threefry", "_reduce_"))
            or any(hasattr(ns, name) for ns in (jnp, jnp.linalg, jax.lax, jax.random)))


@contextlib.contextmanager
def compiled_programs():
    """The names of the programs XLA compiles inside the block (JAX's compile log)."""
    import logging
    import re

    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            found = re.match(r"Finished XLA compilation of jit\((.*)\) in",
                             record.getMessage())
            if found:
                names.append(found.group(1))

    handler, logger = Handler(), logging.getLogger("jax")
    before = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    logger.addHandler(handler)
    try:
        yield names
    finally:
        logger.removeHandler(handler)
        jax.config.update("jax_log_compiles", before)


FIRST_CALL = dict(METHODS,
                  trak_kronecker=lambda t, lg: jattri.trak(t, proj_dim=6, projection="kronecker"),
                  tracin_kronecker=lambda t, lg: jattri.tracin(t, proj_dim=6,
                                                               projection="kronecker"))


@pytest.mark.parametrize("name", sorted(FIRST_CALL))
def test_first_call_runs_no_eager_operation(name):
    """``cache``, ``attribute`` and ``self_attribute`` on two checkpoints compile only
    whole programs of
    jattri's: every eager op (a slice, a zeros, a key, a division) would be an XLA
    compilation of its own on a first call (issue 15: "fold each stage's eager ops into
    one jitted function"). Shapes unusual enough that no earlier test compiled them."""
    p1, p2 = init_mlp(jax.random.PRNGKey(0), d_in=7), init_mlp(jax.random.PRNGKey(1), d_in=7)
    train, test = mlp_data(jax.random.PRNGKey(2), 23, d_in=7), mlp_data(jax.random.PRNGKey(3),
                                                                         5, d_in=7)
    attr = FIRST_CALL[name](jattri.Task(mlp_loss), small_logits)
    jax.clear_caches()
    with compiled_programs() as names:
        members = jattri.checkpoints([p1, p2])
        state = attr.cache(members, train)
        scores = attr.attribute(state, test)
        values = attr.self_attribute(state)
    assert scores.shape == (23, 5) and values.shape == (23,)
    assert names, "the compile log caught nothing: the check is not looking"
    eager = [n for n in names if _eager(n)]
    assert not eager, f"{name}: eager operations compiled on a first call: {eager}"


# ------------------------------------------------- a second call does not retrace

TRACES = {"n": 0}


def counted_loss(params, example, rng=None, rate=None):
    TRACES["n"] += 1  # Python runs only while jax traces the function
    return mlp_loss(params, example, rng, rate)


def traces_of_two_calls(attr) -> tuple:
    """How often the counted functions were traced by a first ``cache`` + ``attribute``
    and by a second one of the same shapes (other members)."""
    p1, p2 = init_mlp(jax.random.PRNGKey(0), d_in=6), init_mlp(jax.random.PRNGKey(1), d_in=6)
    train, test = mlp_data(jax.random.PRNGKey(2), 19, d_in=6), mlp_data(jax.random.PRNGKey(3),
                                                                         4, d_in=6)
    jax.clear_caches()  # programs of another factory of the same functions are reused
    counts = []
    for members in ([p1, p2], [p2, p1]):
        TRACES["n"] = 0
        attr.attribute(attr.cache(jattri.checkpoints(members), train), test)
        counts.append(TRACES["n"])
    return tuple(counts)


@pytest.mark.parametrize("name", sorted(set(FIRST_CALL) - {"knn_shapley", "rps"}))  # no loss
def test_second_call_does_not_trace_the_loss(name):
    """Checks and plans are made once per function and shapes: a second ``cache`` +
    ``attribute`` of the same shapes runs without tracing the loss again (issue 15:
    "checks that do not retrace"); it traced on the first call."""
    first, second = traces_of_two_calls(FIRST_CALL[name](jattri.Task(counted_loss),
                                                         small_logits))
    assert first > 0
    assert second == 0, f"{name}: the loss was traced {second} times again"


def test_a_target_that_is_the_loss_is_checked_once(monkeypatch):
    """A Task's default target is its loss: the check on one example that ``cache``
    made for ``loss_fn`` serves ``attribute``'s ``target_fn`` at the same shapes, so a
    first call traces the loss for its checks once, not twice."""
    from jattri import _checks
    checked = []
    trace_one = _checks._trace_one
    monkeypatch.setattr(_checks, "_trace_one",
                        lambda fn, args: checked.append(fn) or trace_one(fn, args))
    p1 = init_mlp(jax.random.PRNGKey(0), d_in=6)
    train, test = mlp_data(jax.random.PRNGKey(2), 19, d_in=6), mlp_data(jax.random.PRNGKey(3),
                                                                         4, d_in=6)

    def fresh_loss(params, example):  # functions no earlier test has had checked
        return mlp_loss(params, example)

    def fresh_target(params, example):
        return mlp_loss(params, example)

    attr = jattri.grad_dot(fresh_loss)
    attr.attribute(attr.cache(p1, train), test)
    assert len(checked) == 1, checked
    separate = jattri.grad_dot(jattri.Task(fresh_loss, target_fn=fresh_target))
    separate.attribute(separate.cache(p1, train), test)
    # its loss was checked at these shapes already; its own target is checked
    assert len(checked) == 2 and "fresh_target" in repr(checked[1]), checked


def counted_features(params, example):
    TRACES["n"] += 1
    return mlp_features(params, example)


def counted_logits(params, example):
    TRACES["n"] += 1
    return small_logits(params, example)


@pytest.mark.parametrize("name", ["rps", "knn_shapley"])
def test_second_call_does_not_trace_the_feature_functions(name):
    """RPS and KNN-Shapley have no loss: their check of ``features_fn`` (and RPS's
    ``logits_fn``) on one example is made once per shapes too, so a second ``cache`` +
    ``attribute`` traces none of them."""
    attr = (jattri.rps(features_fn=counted_features, logits_fn=counted_logits,
                       label_fn=label, l2=1e-2) if name == "rps" else
            jattri.knn_shapley(3, features_fn=counted_features))
    first, second = traces_of_two_calls(attr)
    assert first > 0
    assert second == 0, f"{name}: traced {second} times again"


# ------------------------------------- members made on the host compile nothing


@pytest.mark.parametrize("kind", ["numpy", "jax", "committed"])
def test_members_from_host_params_compile_nothing(kind):
    """A bare params pytree (one member) and ``jattri.checkpoints`` of numpy or
    CPU-held jax leaves get their member axis from numpy and one transfer: no XLA
    compilation (it was a compiled program of its own in every first call), with the
    same values, shapes and dtypes as the compiled route's, and placed as its output
    would be (committed to the leaves' device only when they were committed: an
    uncommitted result can join data sharded on a mesh)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 3), "b": (3,), "n": (2, 2, 2)}
    plist = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(3)]
    as_jax = kind != "numpy"
    if as_jax:
        device = jax.devices()[-1]
        put = (lambda x: jax.device_put(x, device)) if kind == "committed" else jnp.asarray
        plist = [jax.tree_util.tree_map(put, p) for p in plist]
    with count_compiles() as counter:
        one = jattri.task.as_members(plist[0])
        many = jattri.checkpoints(plist)
    assert counter.n == 0
    for got, ref, num in ((one, jattri.task._one_member_jit(plist[0]), 1),
                          (many, jattri.task._stack_jit(plist), 3)):
        assert got.num == num
        for g, r in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(ref)):
            assert isinstance(g, jax.Array) and g.shape == r.shape and g.dtype == r.dtype
            assert g.committed == (kind == "committed")
            if kind == "committed":
                assert g.devices() == {device}
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    # the host copy is the state's own: changing the user's array later changes nothing
    if not as_jax:
        before = np.asarray(one.params["w"]).copy()
        plist[0]["w"][...] = 7.0
        np.testing.assert_array_equal(np.asarray(one.params["w"]), before)


def test_member_keys_are_fold_in_without_compiling():
    """``member_keys`` is ``fold_in(key, j)`` to the bit: a raw key is folded in numpy,
    with no XLA compilation (a member count no other test uses: a jitted fold would
    compile for it); typed and traced keys by JAX."""
    from jattri.methods import _common

    def reference(key, num):
        return np.asarray(jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num)))

    rng = np.random.default_rng(0)
    words = [(0, 0), (0, 1), (2**32 - 1, 7)] + [tuple(rng.integers(0, 2**32, 2))
                                                for _ in range(5)]
    for w in words:
        key = jax.device_put(np.array(w, np.uint32))
        with count_compiles() as compiles:
            got = np.asarray(_common.member_keys(key, 37))
        assert compiles.n == 0
        np.testing.assert_array_equal(got, reference(key, 37))
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(jax.jit(_common.member_keys, static_argnums=1)(key, 4),
                                  reference(key, 4))
    typed = jax.random.key(5)
    np.testing.assert_array_equal(
        jax.random.key_data(_common.member_keys(typed, 3)),
        jax.random.key_data(jax.vmap(lambda j: jax.random.fold_in(typed, j))(jnp.arange(3))))

"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): every method named in argv
scored on one device and on the training set sharded over the 8, in float32; prints
one JSON line per method with the relative errors and where the per-example arrays
lay."""
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jattri
from jattri import engine
from jattri.methods._common import chunk_grads

D_IN, HIDDEN, CLASSES, N_TRAIN, N_TEST = 12, 16, 4, 64, 10


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES, name="fc2")(jax.nn.relu(nn.Dense(HIDDEN, name="fc1")(x)))


MODEL = MLP()


def loss_fn(params, example):
    x, y = example
    logits = MODEL.apply({"params": params}, x[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def data():
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (N_TRAIN + N_TEST, D_IN), jnp.float32)
    y = jax.random.randint(ky, (N_TRAIN + N_TEST,), 0, CLASSES)
    params = MODEL.init(kp, x[:1])["params"]
    train = (np.asarray(x[:N_TRAIN]), np.asarray(y[:N_TRAIN]))
    test = (np.asarray(x[N_TRAIN:]), np.asarray(y[N_TRAIN:]))
    return params, train, test


METHODS = {
    "trak": lambda: jattri.trak(loss_fn, proj_dim=32, chunk_size=4),
    "trak_kron": lambda: jattri.trak(loss_fn, proj_dim=32, projection="kronecker",
                                     chunk_size=4),
    "grad_dot": lambda: jattri.grad_dot(loss_fn, chunk_size=4),
    "logra": lambda: jattri.logra(loss_fn, proj_dim_in=4, proj_dim_out=4, chunk_size=4),
    "influence_cg": lambda: jattri.influence_cg(loss_fn, damping=1.0, chunk_size=4),
    "influence_ekfac": lambda: jattri.influence_ekfac(loss_fn, chunk_size=4),
    "influence_lissa": lambda: jattri.influence_lissa(loss_fn, damping=1.0, depth=20,
                                                      chunk_size=4),
    "influence_arnoldi": lambda: jattri.influence_arnoldi(loss_fn, rank=8, damping=1.0,
                                                          chunk_size=4),
    "influence_explicit": lambda: jattri.influence_explicit(loss_fn, damping=1.0,
                                                            chunk_size=4),
}

CALLS = []  # (stage, n examples, devices of its layout, per-device partial sums): every
            # engine program traced


def _recording(name, jitted):
    def call(*args, **kwargs):
        layout = kwargs.get("layout")
        data = args[4] if name == "scan" else args[3]
        CALLS.append((name, engine.num_examples(data), 1 if layout is None else layout.devices,
                      bool(kwargs.get("sums"))))
        return jitted(*args, **kwargs)
    return call


engine._scan_jit = _recording("scan", engine._scan_jit)
engine._fill_jit = _recording("per_example", engine._fill_jit)


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def grad_probe(seen):
    """A per-example step computing the chunk's per-example gradients and appending
    their sharding, as XLA lays them out after propagation, to ``seen``."""
    def probe(config, params, chunk):
        g = chunk_grads(lambda p, z, i, aux: loss_fn(p, z), params, None, chunk)
        jax.debug.inspect_array_sharding(g, callback=seen.append)
        return g[:, :1]
    return probe


def sharded_leaves(tree):
    """(devices, spec) of every jax.Array leaf of ``tree`` with a leading axis."""
    out = []
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and leaf.ndim:
            out.append([len(leaf.sharding.device_set), str(getattr(leaf.sharding, "spec", ""))])
    return out


def errors(mesh, train):
    """The messages of jattri.shard's refusals."""
    out = {}
    for case, call in {
            "ragged": lambda: jattri.shard(jax.tree_util.tree_map(lambda x: x[:60], train), mesh),
            "axis": lambda: jattri.shard(train, mesh, "model"),
            "mesh": lambda: jattri.shard(train, jax.devices()),
            "mixed": lambda: engine.layout_of((jattri.shard(train[0], mesh), jattri.shard(
                train[1], Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b")), "b"))),
    }.items():
        try:
            call()
            out[case] = None
        except (TypeError, ValueError) as e:
            out[case] = str(e)
    return out


def main(names):
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params, train, test = data()
    sharded = jattri.shard(train, mesh)
    print(json.dumps({"errors": errors(mesh, train)}), flush=True)
    for name in names:
        attr = METHODS[name]()
        single = attr.cache(params, train)
        one = attr.attribute(single, test)
        top_one = attr.attribute(single, test, top_k=5)
        CALLS.clear()
        state = attr.cache(params, sharded)
        many = attr.attribute(state, test)
        top_many = attr.attribute(state, test, top_k=5)
        train_calls = [c for c in CALLS if c[1] == N_TRAIN]
        # the per-example gradients of a chunk, as XLA lays them out after sharding
        # propagation, through the same engine path the methods' steps take
        seen = []

        rows = engine.per_example(grad_probe(seen), None, params, sharded, 4)
        # inside progress: the stages run one program per chunk, driven from the host
        with jattri.progress(lambda p, final=False: None):
            reported = attr.attribute(attr.cache(params, sharded), test)
        print(json.dumps({
            "progress_rel": relative(reported, one),
            "progress_scores_devices": len(reported.sharding.device_set),
            "method": name,
            "rel": relative(many, one),
            "shape": list(np.shape(many)),
            "scores_devices": len(many.sharding.device_set),
            "top_k_same": bool(np.array_equal(np.asarray(top_many.indices),
                                              np.asarray(top_one.indices))),
            "top_k_rel": relative(top_many.scores, top_one.scores),
            "state_leaves": sharded_leaves(state),
            "train_stages": len(train_calls),
            "train_stage_devices": sorted({c[2] for c in train_calls}),
            "partial_sums": any(c[3] for c in train_calls),
            "grads_devices": [len(x.device_set) for x in seen],
            "grads_spec": [str(getattr(x, "spec", x)) for x in seen],
            "probe_devices": len(rows.sharding.device_set),
        }), flush=True)


def sharded_params(params, train, test, names):
    """Params split over a second mesh axis ("model": the kernels' output columns)
    with the examples over "data": the same scores, and the state's params still split."""
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    def place(x):
        spec = PartitionSpec(None, "model") if x.ndim == 2 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    split = jax.tree_util.tree_map(place, params)
    rows = jattri.shard(train, mesh, "data")
    for name in names:
        attr = METHODS[name]()
        one = attr.attribute(attr.cache(params, train), test)
        state = attr.cache(split, rows)
        print(json.dumps({
            "params_method": name,
            "rel": relative(attr.attribute(state, test), one),
            "kernel_specs": sorted(str(x.sharding.spec) for x in jax.tree_util.tree_leaves(
                state.members.params) if x.ndim == 3),
        }), flush=True)


def streamed(params, train, test):
    """TRAK on the training set streamed in uneven batches, each chunk placed on the
    8 devices (``jattri.stream(..., mesh=)``): the in-memory one-device scores."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    cuts = [0, 5, 23, 40, N_TRAIN]
    batches = [jax.tree_util.tree_map(lambda x: x[a:b], train) for a, b in zip(cuts, cuts[1:])]
    attr = METHODS["trak"]()
    one = attr.attribute(attr.cache(params, train), test)
    state = attr.cache(params, jattri.stream(batches, mesh=mesh))
    seen = []

    engine.per_example(grad_probe(seen), None, params, jattri.stream(batches, mesh=mesh), 4)
    print(json.dumps({"stream": "trak", "rel": relative(attr.attribute(state, test), one),
                      "grads_devices": sorted({len(x.device_set) for x in seen})}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(METHODS))
    sharded_params(*data(), ["trak", "influence_ekfac"])
    streamed(*data())

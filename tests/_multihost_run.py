"""Run by tests/test_multihost.py: one process of a multi-host run on this machine.

``python _multihost_run.py PROCESS_ID NUM_PROCESSES PORT OUT`` joins a
``jax.distributed`` run of NUM_PROCESSES processes on 127.0.0.1 (gloo CPU
collectives, 2 CPU devices each), builds the global training set from this process's
own contiguous slice only (``jax.make_array_from_process_local_data``), and scores
every method of tests/_sharded_run.py's toy MLP. Process 0 writes the dense scores and
the top-k (gathered from every process) to OUT (.npz). NUM_PROCESSES=1: one process
holding all of the training set on one device, the reference.
"""
import os
import sys

process_id, num_processes, port, out_path = (int(sys.argv[1]), int(sys.argv[2]),
                                             int(sys.argv[3]), sys.argv[4])
fast = os.environ.get("JATTRI_TEST_FAST_XLA", "")  # the suite's fast compile
os.environ["XLA_FLAGS"] = (fast + " --xla_force_host_platform_device_count=2"
                           if num_processes > 1 else fast).strip()
os.environ["JATTRI_COMPILE_CACHE"] = "0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sharded_run import N_TRAIN, data  # noqa: E402

import jattri  # noqa: E402
from _sharded_run import loss_fn  # noqa: E402

# TRAK (stored features, a Gram summed over hosts) and CG (curvature products summed
# over hosts inside CG's own jit); EK-FAC's factor sums take TRAK's path.
METHODS = {
    "trak": lambda: jattri.trak(loss_fn, proj_dim=32, chunk_size=4),
    "influence_cg": lambda: jattri.influence_cg(loss_fn, damping=1.0, chunk_size=4),
}

params, train, test = data()
if num_processes > 1:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
    per = N_TRAIN // num_processes
    mine = jax.tree_util.tree_map(lambda x: x[process_id * per:(process_id + 1) * per], train)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    train = jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), mine)
    assert train[0].shape[0] == N_TRAIN and not train[0].is_fully_addressable

results = {}
for name, make in METHODS.items():
    attr = make()
    state = attr.cache(params, train)
    scores = attr.attribute(state, test)
    top = attr.attribute(state, test, top_k=5, lowest=True)
    gathered = multihost_utils.process_allgather(
        (scores, top.indices, top.scores, top.lowest_indices, top.lowest_scores), tiled=True)
    for key, value in zip(("scores", "top", "top_scores", "low", "low_scores"), gathered):
        results[f"{name}/{key}"] = np.asarray(value)
    results[f"{name}/devices"] = np.array(len(scores.sharding.device_set))
if process_id == 0:
    np.savez(out_path, **results)
print("done", process_id, flush=True)

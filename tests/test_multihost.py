"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 2 devices
each), each holding half of the training set, score as one process holding all of it
(issue 11): dense scores within 1e-5, top-k and bottom-k indices identical, merged
across hosts. The processes run tests/_multihost_run.py."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RUN = Path(__file__).resolve().parent / "_multihost_run.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id, num_processes, port, out):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, str(RUN), str(process_id), str(num_processes),
                             str(port), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait(procs):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            outs.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, err in outs:
        assert rc == 0, err[-4000:]


def test_two_hosts_equal_one(tmp_path):
    port = _free_port()
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _wait([_launch(0, 2, port, two), _launch(1, 2, port, two), _launch(0, 1, 0, one)])
    ref, got = np.load(one), np.load(two)
    for method in ("trak", "influence_cg"):
        assert int(ref[f"{method}/devices"]) == 1 and int(got[f"{method}/devices"]) == 4
        want = ref[f"{method}/scores"]
        assert got[f"{method}/scores"].shape == want.shape == (64, 10)
        scale = np.abs(want).max()
        for key in ("scores", "top_scores", "low_scores"):
            np.testing.assert_allclose(got[f"{method}/{key}"], ref[f"{method}/{key}"],
                                       rtol=0, atol=1e-5 * scale, err_msg=f"{method}/{key}")
        for key in ("top", "low"):
            np.testing.assert_array_equal(got[f"{method}/{key}"], ref[f"{method}/{key}"],
                                          err_msg=f"{method}/{key}")
        # the top-k is the dense matrix's: merged across hosts, nothing lost
        dense = got[f"{method}/scores"]
        np.testing.assert_array_equal(got[f"{method}/top"],
                                      np.argsort(-dense, axis=0, kind="stable")[:5].T)

"""EK-FAC on the MNIST-shaped LR at issue 15's size (784 features, 10 classes,
7,850 params, random weights; 5,000 train x 500 test): time of three cache +
attribute calls and the process's peak RSS (VmHWM).

    python benchmarks/ekfac_lr_memory.py
"""
import time, jax, jax.numpy as jnp, flax.linen as nn, jattri
def peak():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"): return int(l.split()[1])/1024
model = nn.Dense(10)
def loss(params, z):
    x, y = z
    return -jax.nn.log_softmax(model.apply({"params": params}, x))[y]
k = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(k[0], (5500, 784)); y = jax.random.randint(k[1], (5500,), 0, 10)
params = model.init(k[2], x[0])["params"]
train, test = (x[:5000], y[:5000]), (x[5000:], y[5000:])
attr = jattri.influence_ekfac(loss, damping=1e-2)
print("before MiB", peak())
for rep in range(3):
    t = time.perf_counter()
    s = jax.block_until_ready(attr.attribute(attr.cache(params, train), test))
    print(f"call {rep}: {time.perf_counter()-t:.2f} s, peak MiB {peak():.0f}", flush=True)

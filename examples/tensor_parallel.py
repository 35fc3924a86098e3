"""Data x tensor parallel training with a vocabulary-parallel cross-entropy.

A small next-token model (embedding -> tanh MLP -> output layer over the
vocabulary) is trained on a mesh of ``data x model`` devices, 2 x 4 by default:

* the batch is split over ``data``;
* the output layer ``w_out`` (hidden x vocab) and its bias are split over
  ``model`` along the vocabulary, so each device only ever holds its own block
  of the logits, and the loss is
  ``jaxsoftmax.softmax_cross_entropy_with_integer_labels(..., axis_name="model")``
  on that block, with global label ids;
* the other parameters are replicated. Autodiff through ``jax.shard_map`` adds
  the all-reduces their gradients need.

Every step, the loss and the gradients are checked against the same model on
a single device, computed with ``optax.softmax_cross_entropy_with_integer_labels``
on the full logits, at the same parameters. The script exits with status 1 if
any step differs by more than ``--rtol``.

By default the devices are simulated: ``--devices`` CPU devices are requested
before JAX starts. With ``--distributed`` the script first calls
``jax.distributed.initialize()``, and the same code runs on several hosts (see
the README, "Scaling out").

    python examples/tensor_parallel.py
    python examples/tensor_parallel.py --mesh 4x2 --steps 50 --vocab 512
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsoftmax


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    epilog="Prints, per step, the sharded and single-device losses and the largest "
    "relative gradient difference; exits with 1 if a step is off by more than --rtol.",
  )
  parser.add_argument("--mesh", default="2x4", help="DATAxMODEL mesh shape (default 2x4)")
  parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
  parser.add_argument("--batch", type=int, default=32, help="global batch size (default 32)")
  parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
  parser.add_argument("--hidden", type=int, default=64, help="hidden width (default 64)")
  parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--dtype", choices=["float32", "float64"], default="float32", help="parameter dtype"
  )
  parser.add_argument(
    "--rtol", type=float, default=None, help="tolerance (default 1e-4 float32, 1e-10 float64)"
  )
  parser.add_argument(
    "--devices",
    type=int,
    default=None,
    help="CPU devices to simulate per process, set before JAX starts (default: "
    "DATA*MODEL / processes); 0 uses the platform's real devices",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first: one process per host. Without the "
    "three options below, JAX finds the coordinator and process ids itself on clusters it "
    "knows (SLURM, Open MPI, Kubernetes, Cloud TPU)",
  )
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  args = parser.parse_args(argv)
  try:
    args.data, args.model = (int(n) for n in args.mesh.lower().split("x"))
  except ValueError:
    parser.error(f"--mesh must look like 2x4, got {args.mesh!r}")
  if args.vocab % args.model or args.batch % args.data:
    parser.error("--vocab must divide by MODEL and --batch by DATA")
  if args.rtol is None:
    args.rtol = 1e-4 if args.dtype == "float32" else 1e-10
  return args


def init_params(key, vocab: int, hidden: int, dtype) -> dict[str, jax.Array]:
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "embed": jax.random.normal(k1, (vocab, hidden), dtype),
    "w1": jax.random.normal(k2, (hidden, hidden), dtype) / math.sqrt(hidden),
    "b1": jnp.zeros((hidden,), dtype),
    "w_out": jax.random.normal(k3, (hidden, vocab), dtype) / math.sqrt(hidden),
    "b_out": jnp.zeros((vocab,), dtype),
  }


# The output layer is split over the vocabulary; everything else is replicated.
PARAM_SPECS = {
  "embed": P(),
  "w1": P(),
  "b1": P(),
  "w_out": P(None, "model"),
  "b_out": P("model"),
}


def hidden_states(params, tokens):
  return jnp.tanh(params["embed"][tokens] @ params["w1"] + params["b1"])


def sharded_loss(mesh: Mesh):
  """Mean next-token loss; inside, each device sees its batch rows and vocabulary block."""

  def local(params, tokens, labels):
    logits = hidden_states(params, tokens) @ params["w_out"] + params["b_out"]
    # `logits` is (batch / DATA, vocab / MODEL); `labels` are global class ids.
    return jaxsoftmax.softmax_cross_entropy_with_integer_labels(logits, labels, axis_name="model")

  per_example = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(PARAM_SPECS, P("data"), P("data")),
    out_specs=P("data"),  # the loss is the same on every device of a `model` row
  )
  return lambda params, tokens, labels: jnp.mean(per_example(params, tokens, labels))


def reference_loss(params, tokens, labels):
  """The same model on one device, with optax's cross-entropy on the full logits."""
  logits = hidden_states(params, tokens) @ params["w_out"] + params["b_out"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def synthetic_batches(rng: np.random.Generator, vocab: int, batch: int):
  """(token, next token) pairs from a fixed random Markov chain over the vocabulary."""
  successors = rng.integers(0, vocab, size=(vocab, 4))
  while True:
    tokens = rng.integers(0, vocab, size=batch)
    labels = successors[tokens, rng.integers(0, 4, size=batch)]
    yield tokens.astype(np.int32), labels.astype(np.int32)


def count_collectives(hlo: str) -> dict[str, int]:
  names = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
  return {n: hlo.count(f" {n}(") + hlo.count(f" {n}-start(") for n in names}


def to_host(tree):
  """The full (global) value of each leaf, as NumPy arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def max_rel_diff(a, b) -> float:
  """The largest ``|a - b| / max|b|`` over the leaves of two pytrees."""
  diffs = jax.tree.map(
    lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30)),
    a,
    b,
  )
  return max(jax.tree.leaves(diffs))


def main(argv=None) -> int:
  args = parse_args(argv)
  # Before JAX starts its backend: the device set, then the process group.
  if args.devices != 0:
    per_process = args.data * args.model // (args.num_processes or 1)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices or per_process)
  if args.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  if args.distributed:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  dtype = jnp.dtype(args.dtype)

  devices = jax.devices()
  if len(devices) < args.data * args.model:
    print(f"need {args.data * args.model} devices, have {len(devices)}", file=sys.stderr)
    return 2
  mesh = Mesh(
    np.array(devices[: args.data * args.model]).reshape(args.data, args.model),
    ("data", "model"),
    axis_types=(AxisType.Auto, AxisType.Auto),
  )
  shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
  print(
    f"mesh data x model = {args.data} x {args.model} on {len(devices)} "
    f"{devices[0].platform} devices ({jax.process_count()} process(es)); vocab {args.vocab}, "
    f"hidden {args.hidden}, batch {args.batch}, {args.dtype}"
  )

  params = init_params(jax.random.key(args.seed), args.vocab, args.hidden, dtype)
  params = jax.device_put(params, jax.tree.map(shard, PARAM_SPECS))
  optimizer = optax.adam(args.lr)
  opt_state = optimizer.init(params)

  loss_fn = sharded_loss(mesh)

  @jax.jit
  def train_step(params, opt_state, tokens, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  reference = jax.jit(jax.value_and_grad(reference_loss))
  one_device = jax.local_devices()[0]

  batches = synthetic_batches(np.random.default_rng(args.seed), args.vocab, args.batch)
  tokens, labels = next(batches)

  def place(a):
    # Each process passes the rows of the global batch that live on its devices.
    sharding = shard(P("data"))
    index = sharding.addressable_devices_indices_map(a.shape)
    rows = sorted({idx[0].indices(a.shape[0])[:2] for idx in index.values()})
    local = np.concatenate([a[slice(*r)] for r in rows])
    return jax.make_array_from_process_local_data(sharding, local, a.shape)

  lowered = train_step.lower(params, opt_state, place(tokens), place(labels))
  counts = {k: v for k, v in count_collectives(lowered.compile().as_text()).items() if v}
  print(f"collectives in the compiled train step: {counts}")

  worst, start = 0.0, time.perf_counter()
  print(f"{'step':>4} {'loss (sharded)':>15} {'loss (1 device)':>16} {'grad rel diff':>14}")
  for step in range(args.steps):
    if step:
      tokens, labels = next(batches)
    gathered = to_host(params)  # the parameters this step starts from
    params, opt_state, loss, grads = train_step(params, opt_state, place(tokens), place(labels))
    ref_loss, ref_grads = reference(
      jax.device_put(gathered, one_device), jnp.asarray(tokens), jnp.asarray(labels)
    )
    loss_diff = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    grad_diff = max_rel_diff(to_host(grads), jax.device_get(ref_grads))
    worst = max(worst, loss_diff, grad_diff)
    print(f"{step:4d} {float(loss):15.6f} {float(ref_loss):16.6f} {grad_diff:14.2e}")
  elapsed = time.perf_counter() - start
  print(f"{args.steps} steps in {elapsed:.2f} s; largest relative difference {worst:.2e}")
  if worst > args.rtol:
    print(f"FAILED: difference above --rtol={args.rtol:g}", file=sys.stderr)
    return 1
  print(f"OK: loss and gradients match the single-device model (rtol {args.rtol:g})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

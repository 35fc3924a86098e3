"""Train a small patch-embedding transformer on scikit-learn's 8x8 digits.

The data set ships with scikit-learn (1797 images of handwritten digits, no
download). Each image is cut into 9 overlapping patches of 4x4 pixels (stride
2), which go through two pre-norm transformer blocks whose attention is
``jaxsoftmax.dot_product_attention``, and the model is trained with
``jaxsoftmax.softmax_cross_entropy_with_integer_labels`` and optax's adamw in a
``jax.jit``-compiled step.

    python examples/train_digits.py                 # train, report, plot
    python examples/train_digits.py --check         # also train with jax.nn/optax; compare
    python examples/train_digits.py --steps 20 --out /tmp/curves.png

``--check`` trains the same model a second time, from the same seed and on
the same batches, with Flax's default attention (``jax.nn``) and
``optax.softmax_cross_entropy_with_integer_labels`` in place of ours, and
prints the largest relative difference between the two loss curves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxsoftmax

PATCH, STRIDE = 4, 2  # 8x8 image -> 3x3 = 9 overlapping tokens of 4x4 pixels
STARTS = range(0, 8 - PATCH + 1, STRIDE)
NUM_CLASSES = 10


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, dim: int, heads: int, attention_fn, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads, in_features=dim, attention_fn=attention_fn, decode=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class PatchTransformer(nnx.Module):
  """Patches -> linear embedding + learned positions -> blocks -> mean pool -> logits."""

  def __init__(self, dim: int, heads: int, depth: int, attention_fn, rngs: nnx.Rngs):
    tokens = len(STARTS) ** 2
    self.embed = nnx.Linear(PATCH * PATCH, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, dim), jnp.float32))
    self.blocks = nnx.List([Block(dim, heads, attention_fn, rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, NUM_CLASSES, rngs=rngs)

  def __call__(self, images):  # images: [batch, 8, 8] in [0, 1]
    b = images.shape[0]
    p = [images[:, i : i + PATCH, j : j + PATCH].reshape(b, -1) for i in STARTS for j in STARTS]
    x = self.embed(jnp.stack(p, axis=1)) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x).mean(axis=1))


def load_data(seed: int):
  """Normalised images and labels, split 80/20 (stratified) into train and held-out."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def train(args, attention_fn, loss_fn, data, desc: str, progress: bool = True):
  """Trains one model; returns its per-step curves, held-out accuracy and wall time."""
  x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in data)
  model = PatchTransformer(args.dim, args.heads, args.depth, attention_fn, nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10 + 1, args.steps)
  tx = optax.adamw(schedule, weight_decay=args.weight_decay)
  opt_state = tx.init(params)

  def forward(params, images):
    return nnx.merge(graphdef, params)(images)

  @jax.jit
  def train_step(params, opt_state, images, labels):
    def loss(params):
      logits = forward(params, images)
      return loss_fn(logits, labels).mean(), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(params, updates), opt_state, value, accuracy

  @jax.jit
  def evaluate(params, images, labels):
    logits = forward(params, images)
    return loss_fn(logits, labels).mean(), jnp.mean(jnp.argmax(logits, -1) == labels)

  # The batches come from a NumPy generator of their own, so that --check's two
  # runs see exactly the same batches in the same order.
  batches = np.random.default_rng(args.seed)
  n = x_train.shape[0]
  curves = {"step": [], "loss": [], "accuracy": [], "eval_step": [], "test_accuracy": []}
  start = time.perf_counter()
  bar = tqdm(range(args.steps), desc=desc, disable=not progress, mininterval=0.5)
  for step in bar:
    idx = jnp.asarray(batches.choice(n, args.batch_size, replace=False))
    params, opt_state, loss, acc = train_step(params, opt_state, x_train[idx], y_train[idx])
    loss, acc = float(loss), float(acc)
    curves["step"].append(step)
    curves["loss"].append(loss)
    curves["accuracy"].append(acc)
    if step % args.eval_every == 0 or step == args.steps - 1:
      _, test_acc = evaluate(params, x_test, y_test)
      curves["eval_step"].append(step)
      curves["test_accuracy"].append(float(test_acc))
    bar.set_postfix(
      loss=f"{loss:.4f}", acc=f"{acc:.3f}", test_acc=f"{curves['test_accuracy'][-1]:.3f}"
    )
  test_loss, test_acc = evaluate(params, x_test, y_test)
  return {
    "curves": curves,
    "test_loss": float(test_loss),
    "test_accuracy": float(test_acc),
    "seconds": time.perf_counter() - start,
  }


def plot(result, path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  c = result["curves"]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax_loss.plot(c["step"], c["loss"], lw=0.8, label="training batch")
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("cross-entropy")
  ax_loss.set_title("loss")
  ax_loss.legend()
  ax_acc.plot(c["step"], c["accuracy"], lw=0.8, alpha=0.6, label="training batch")
  ax_acc.plot(c["eval_step"], c["test_accuracy"], marker="o", ms=3, label="held-out")
  ax_acc.set_ylim(0.0, 1.02)
  ax_acc.set_xlabel("step")
  ax_acc.set_title(f"accuracy (held-out at the end: {result['test_accuracy']:.1%})")
  ax_acc.legend(loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def max_relative_difference(a, b) -> tuple[float, int]:
  """The largest ``|a - b| / |b|`` over the curves, and the step where it occurs."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rel = np.abs(a - b) / np.abs(b)
  return float(rel.max()), int(rel.argmax())


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of adamw")
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--dim", type=int, default=64, help="token width")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--depth", type=int, default=2, help="transformer blocks")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval")
  p.add_argument(
    "--out",
    type=Path,
    default=Path(__file__).with_name("digits_curves.png"),
    help="where to write the PNG of the curves (default: examples/digits_curves.png)",
  )
  p.add_argument(
    "--check",
    action="store_true",
    help="also train with jax.nn attention and optax's loss; print the loss-curve difference",
  )
  p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error("--steps must be at least 1")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  data = load_data(args.seed)
  print(
    f"digits: {len(data[0])} training and {len(data[1])} held-out images; "
    f"{jax.device_count()} {jax.default_backend()} device(s)"
  )
  ours = train(
    args,
    jaxsoftmax.dot_product_attention,
    jaxsoftmax.softmax_cross_entropy_with_integer_labels,
    data,
    "jaxsoftmax",
    not args.no_progress,
  )
  print(
    f"held-out accuracy {ours['test_accuracy']:.2%} (loss {ours['test_loss']:.4f}) "
    f"after {args.steps} steps in {ours['seconds']:.1f} s"
  )
  plot(ours, args.out, f"digits, {args.steps} steps: jaxsoftmax attention + cross-entropy")
  print(f"curves written to {args.out}")
  result = {"ours": ours}
  if args.check:
    ref = train(
      args,
      nnx.dot_product_attention,  # Flax's default: jax.nn.dot_product_attention
      optax.softmax_cross_entropy_with_integer_labels,
      data,
      "jax.nn/optax",
      not args.no_progress,
    )
    diff, step = max_relative_difference(ours["curves"]["loss"], ref["curves"]["loss"])
    print(
      f"check: jax.nn/optax held-out accuracy {ref['test_accuracy']:.2%}; largest relative "
      f"difference between the two training-loss curves: {diff:.2e} (at step {step}, "
      f"where the loss is {ref['curves']['loss'][step]:.4g})"
    )
    result.update(reference=ref, max_relative_loss_difference=diff)
  return result


if __name__ == "__main__":
  main()

"""The Keras reference ("GANs in Action" ch. 2 VAE) on Fashion-MNIST, with the book's loss as
written, for `bench/parity.py`.

The book compiles its model as

    vae.add_loss(K.mean(kl_loss) / 784.)
    vae.compile(optimizer='rmsprop', loss='binary_crossentropy')

so Keras minimises the negative ELBO in nats per image divided by 784 (binary_crossentropy is a
mean over the pixels). This script does exactly that, in Keras 3: the functional `add_loss` of
Keras 2 is gone, so the KL term is added inside the model's `call`, which Keras 3 sums into the
loss the same way. Losses are printed x 784, in nats per image, as vaeexp logs them.

Not a vaeexp dependency: install Keras and JAX beside vaeexp (its torch is used for the check
below), e.g.

    python -m venv --system-site-packages /opt/keras && /opt/keras/bin/pip install keras jax
    /opt/keras/bin/python bench/keras_reference.py --epochs 50 --seed 0

Before training it checks, on one batch with the same weights and noise, that Keras's loss is
vaeexp's nats-per-image loss / 784 (vaeexp.model.loss_terms), and prints both.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras
import numpy as np
from keras import layers, ops

ROOT = "/usr/share/datasets/fashion-mnist/"
PIXELS = 784


def idx(path: str) -> np.ndarray:
    """An IDX file as an array (written here so that the script needs only Keras and numpy)."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class VAE(keras.Model):
    """784 -> 256 relu -> (mean, log_var) 2 -> z -> 256 relu -> 784 sigmoid; Keras defaults
    (Glorot-uniform kernels, zero biases). `noise`, if given, replaces the random draw."""

    def __init__(self, seed: int, noise: np.ndarray | None = None):
        super().__init__()
        self.h = layers.Dense(256, "relu")
        self.mean, self.log_var = layers.Dense(2), layers.Dense(2)
        self.dec_h, self.dec_out = layers.Dense(256, "relu"), layers.Dense(PIXELS, "sigmoid")
        self.seeds = keras.random.SeedGenerator(seed)
        self.noise = noise

    def call(self, x):
        h = self.h(x)
        z_mean, z_log_var = self.mean(h), self.log_var(h)
        if self.noise is None:
            epsilon = keras.random.normal(ops.shape(z_mean), stddev=1.0, seed=self.seeds)
        else:
            epsilon = ops.convert_to_tensor(self.noise)
        z = z_mean + ops.exp(z_log_var / 2) * epsilon
        # The book, as written: kl summed over latent dims, then add_loss(mean(kl) / 784).
        kl_loss = -0.5 * ops.sum(1 + z_log_var - ops.exp(z_log_var) - ops.square(z_mean), axis=-1)
        self.add_loss(ops.mean(kl_loss) / 784.0)
        return self.dec_out(self.dec_h(z))


def compiled(model: VAE) -> VAE:
    model.compile(optimizer="rmsprop", loss="binary_crossentropy")
    model(np.zeros((100, PIXELS), "float32"))  # creates the weights
    return model


def check_scale(vae: VAE, x: np.ndarray, seed: int) -> tuple[float, float]:
    """Keras's loss on one batch and vaeexp's nats-per-image loss / 784, same weights and noise."""
    import torch

    from vaeexp.model import VAE as TorchVAE
    from vaeexp.model import loss_terms

    noise = np.random.default_rng(seed).standard_normal((len(x), 2)).astype("float32")
    twin = compiled(VAE(seed, noise))
    twin.set_weights(vae.get_weights())
    keras_loss = float(twin.test_on_batch(x, x))

    ours = TorchVAE(2, 256)
    dense = [vae.h, vae.mean, vae.log_var, vae.dec_h, vae.dec_out]
    linear = [ours.encoder, ours.z_mean, ours.z_log_var, ours.decoder_h, ours.decoder_out]
    with torch.no_grad():
        for k, t in zip(dense, linear, strict=True):
            kernel, bias = (np.asarray(w) for w in k.get_weights())
            t.weight.copy_(torch.from_numpy(kernel))
            t.bias.copy_(torch.from_numpy(bias))
        recon, kl = loss_terms(ours, torch.from_numpy(x), noise=torch.from_numpy(noise))
    return keras_loss, (recon + kl).mean().item() / PIXELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the per-epoch losses (nats per image) here")
    args = parser.parse_args()

    x_train = idx(ROOT + "train-images-idx3-ubyte.gz").reshape(-1, PIXELS).astype("float32") / 255
    x_test = idx(ROOT + "t10k-images-idx3-ubyte.gz").reshape(-1, PIXELS).astype("float32") / 255
    keras.utils.set_random_seed(args.seed)
    vae = compiled(VAE(args.seed))

    batch = x_train[:100]
    keras_loss, ours = check_scale(vae, batch, args.seed)
    print(
        f"one batch, initial weights: Keras loss {keras_loss:.6f}, vaeexp nats/image / 784 "
        f"{ours:.6f} (ratio {keras_loss / ours:.6f})",
        flush=True,
    )

    history = {"train": [], "test": []}

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            history["train"].append(logs["loss"] * PIXELS)
            history["test"].append(logs["val_loss"] * PIXELS)
            print(
                f"epoch {epoch + 1}: train {logs['loss'] * PIXELS:.2f}  "
                f"test {logs['val_loss'] * PIXELS:.2f} nats/image",
                flush=True,
            )

    start = time.time()
    vae.fit(
        x_train,
        x_train,
        shuffle=True,
        epochs=args.epochs,
        batch_size=100,
        validation_data=(x_test, x_test),
        verbose=0,
        callbacks=[Report()],
    )
    seconds = time.time() - start
    keras_loss, ours = check_scale(vae, x_test[:100], args.seed)
    print(
        f"one test batch, trained weights: Keras loss {keras_loss:.6f}, vaeexp nats/image / 784 "
        f"{ours:.6f} (ratio {keras_loss / ours:.6f})"
    )
    print(
        f"keras {keras.__version__} ({keras.backend.backend()}), seed {args.seed}, "
        f"{args.epochs} epochs, {seconds:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "keras": keras.__version__,
                    "backend": keras.backend.backend(),
                    "seed": args.seed,
                    **history,
                },
                f,
            )


if __name__ == "__main__":
    main()

"""The Keras reference ("GANs in Action" ch. 2 VAE) on Fashion-MNIST, for parity checks.

Not a vaeexp dependency: run it in its own environment, e.g.

    python -m venv /tmp/keras && /tmp/keras/bin/pip install keras jax
    /tmp/keras/bin/python bench/keras_reference.py 50

It prints Keras's per-epoch test loss (val_loss, the negative ELBO in nats), to compare with
`python -m vaeexp experiment=reference data=fashion_mnist`.
"""

import gzip
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras
import numpy as np
from keras import layers, ops

ROOT = "/usr/share/datasets/fashion-mnist/"


def idx(path):
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class VAE(keras.Model):
    """784 -> 256 relu -> (mean, log_var) 2 -> z -> 256 relu -> 784 sigmoid; Keras defaults."""

    def __init__(self):
        super().__init__()
        self.h = layers.Dense(256, "relu")
        self.mean, self.log_var = layers.Dense(2), layers.Dense(2)
        self.dec_h, self.dec_out = layers.Dense(256, "relu"), layers.Dense(784, "sigmoid")
        self.noise = keras.random.SeedGenerator(1)

    def call(self, x):
        h = self.h(x)
        mean, log_var = self.mean(h), self.log_var(h)
        eps = keras.random.normal(ops.shape(mean), stddev=1.0, seed=self.noise)
        kl = -0.5 * ops.sum(1 + log_var - ops.square(mean) - ops.exp(log_var), axis=-1)
        self.add_loss(ops.mean(kl))
        return self.dec_out(self.dec_h(mean + ops.exp(log_var / 2) * eps))


def main():
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    x_train = idx(ROOT + "train-images-idx3-ubyte.gz").reshape(-1, 784).astype("float32") / 255
    x_test = idx(ROOT + "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype("float32") / 255
    keras.utils.set_random_seed(0)
    vae = VAE()
    vae.compile(
        optimizer="rmsprop", loss=lambda x, x_hat: 784 * keras.losses.binary_crossentropy(x, x_hat)
    )
    start = time.time()
    history = vae.fit(
        x_train,
        x_train,
        shuffle=True,
        epochs=epochs,
        batch_size=100,
        validation_data=(x_test, x_test),
        verbose=2,
    )
    print(f"keras {keras.__version__} ({keras.backend.backend()}), {time.time() - start:.0f} s")
    for epoch, loss in enumerate(history.history["val_loss"], 1):
        print(f"epoch {epoch}: test loss {loss:.2f}")


if __name__ == "__main__":
    main()

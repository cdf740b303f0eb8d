"""Hydra instantiates launchers only from the `hydra_plugins` namespace, so vaeexp's SLURM
launcher (`hydra/launcher=slurm`) is registered here; everything it does lives in vaeexp.slurm."""

from vaeexp import slurm


class SlurmLauncher(slurm.SlurmLauncher):
    """`hydra/launcher=slurm`: see vaeexp.slurm."""

"""Hydra instantiates launchers only from the `hydra_plugins` namespace, so vaeexp's launchers
(`hydra/launcher=slurm`, `hydra/launcher=stacked`) are registered here; everything they do
lives in vaeexp.slurm and vaeexp.stacked."""

from vaeexp import slurm, stacked


class SlurmLauncher(slurm.SlurmLauncher):
    """`hydra/launcher=slurm`: see vaeexp.slurm."""


class StackedLauncher(stacked.StackedLauncher):
    """`hydra/launcher=stacked`: see vaeexp.stacked."""

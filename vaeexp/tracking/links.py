"""Where to look at a run: its page in the MLflow UI's model-training view, and the summary a
finished run or sweep prints."""

from __future__ import annotations

import shlex

UI = "http://127.0.0.1:5000"  # where `python -m vaeexp.ui` serves a local store


def ui_link(uri: str, experiment_id: str, run_id: str | None = None, base: str = UI) -> str:
    """The page of an experiment (or one of its runs). MLflow 3.17 opens its GenAI view until
    the user flips a toggle, whatever the experiment's kind tag says: the link sets it."""
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    page = f"{base}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"


def how_to_open(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The link, preceded by the command that serves it when the store is not a server."""
    link = ui_link(uri, experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return link
    return f"python -m vaeexp.ui --uri {shlex.quote(uri)}  then open  {link}"


def run_summary(
    name: str,
    run_id: str,
    status: str,
    metrics: dict[str, float],
    folder: str,
    opener: str,
) -> str:
    """A few lines for the end of a run: what it was, how it did, where to find it."""
    parts = [f"test loss {metrics['test/loss']:.2f}"] if "test/loss" in metrics else []
    if "test/neg_elbo" in metrics:
        parts.append(f"negative ELBO {metrics['test/neg_elbo']:.2f}")
    parts += [
        f"IWAE bound (k={k.removeprefix('test_nll_iwae_k')}) {v:.2f}"
        for k, v in metrics.items()
        if k.startswith("test_nll_iwae_k")
    ]
    return "\n".join(
        [
            f"vaeexp: run {name} ({run_id}) {status}",
            f"  {', '.join(parts)} nats per image" if parts else "  no test metrics",
            f"  folder: {folder}",
            f"  open:   {opener}",
        ]
    )

"""The latent film: watch the latent space form, in the MLflow UI and as a GIF."""

from vaeexp.film.recorder import FilmError, FilmRecorder, StackFilm, filming

__all__ = ["FilmError", "FilmRecorder", "StackFilm", "filming"]

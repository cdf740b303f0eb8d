"""MLflow: one run per training job, and everything that reaches the store.

store      is the store there, and the experiment in it
logger     the trainer's logger: buffered metrics, images, artifacts (only logs)
outbox     delivery that outlives the server
run        `tracked_run`: a run that always ends with a status; the params and tags it starts
           with, the models it exports for mlflow.pyfunc
"""

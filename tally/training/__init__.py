"""One training run: the same function locally (`tally train`) and in every Ray Train worker.

The front door re-exports run.py (the run, its evaluation, re-evaluation of a finished run);
checkpoints.py (atomic saves, safe loads, exact resume) and distributed.py (what DDP workers share)
are its submodules.
"""

from tally.training.run import (  # noqa: F401
    CHECKPOINT_VERSION,
    BatchSource,
    RunContext,
    TrainStep,
    bank_fits_on_device,
    build_method_for,
    build_optimizer,
    check_run_folder,
    evaluate_run_split,
    evaluate_split,
    finalize,
    load_trained_method,
    predict,
    resolve_device,
    seed_everything,
    selection_split,
    train_run,
)

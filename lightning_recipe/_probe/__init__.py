"""Running the user's own step on a copy of the model, and seeing what reaches the loss.

Every check needs "the loss of this model on this batch" and often "the logits and targets
that went into the loss". Rather than guessing the model's ``forward`` signature, we call the
user's ``training_step`` on a deep copy of the LightningModule (``self.log`` silenced, the
trainer's loggers hidden) inside a :class:`LossCapture` torch-function mode that records every
call to a ``torch.nn.functional`` loss (``nn.CrossEntropyLoss`` and friends call those too).
RNG state is saved and restored around everything, so the real run is bit-identical.

The layer is split by concern: ``base``, ``state``, ``capture``, ``reference``, ``copies``, ``steps``."""

from __future__ import annotations

from lightning_recipe._probe.base import (  # noqa: F401
    ProbeSkip,
    StepFn,
    UserStepError,
)
from lightning_recipe._probe.capture import (  # noqa: F401
    _LOSS_BY_NAME,
    _SQUASHERS,
    CLASS_LOSSES,
    LOSS_FUNCTIONS,
    REGRESSION_LOSSES,
    LossCall,
    LossCapture,
    StepResult,
    _storage_ptr,
)
from lightning_recipe._probe.copies import (  # noqa: F401
    _COMPILED_STEPS,
    _HOOK_DICTS,
    _RECIPE_HOOK_IDS,
    HookSet,
    _LocalBatchNorm,
    _localize_sync_batchnorm,
    _LocalStrategy,
    _noop,
    _run_eagerly,
    _SilentTrainer,
    _strip_recipe_hooks,
    copy_module,
    track_hook,
    untrack_hook,
)
from lightning_recipe._probe.reference import (  # noqa: F401
    CHANCE,
    MEAN_PREDICTOR,
    ClassScores,
    chance_input,
    class_scores,
    class_view,
    know_nothing,
    know_nothing_loss,
    looks_like_probabilities,
    rounding_eps,
    scores_by_shape,
)
from lightning_recipe._probe.state import (  # noqa: F401
    _mps_rng_state,
    default_dtype,
    preserved_grads,
    preserved_modes,
    preserved_rng,
    seed_rngs,
)
from lightning_recipe._probe.steps import (  # noqa: F401
    STEP_HOOKS,
    EvalStep,
    batch_or_peek,
    call_step,
    call_training_step,
    call_validation_step,
    capture_step,
    extract_loss,
    find_loss,
    has_own_validation_step,
    is_manual_optimization,
    iter_train_batches,
    peek_train_batch,
    run_step,
    takes_dataloader_iter,
    user_call,
)

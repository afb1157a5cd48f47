"""Every hook the clusterkit trainer calls, in the order it calls them.

A plugin is a class with methods marked ``@hookimpl`` whose names are the hook
names below.  An implementation may take any subset of a spec's arguments (pluggy
passes them by name), so specs can grow arguments without breaking plugins.

The loop (``Trainer.fit`` in ``clusterkit/engine/trainer.py``: build, begin_run, then per epoch
begin_epoch, train_step per batch, end_epoch; finally summary)::

    setup                    once: add modules to state.model, return parameter groups
    register_outputs         once: name the per-step tensors you can produce ("q", "k", ...)
    for epoch:
        on_epoch_start
        e_step               every e_step.every epochs (and before the first)
        for batch:
            on_step_start    before the forward (e.g. an extra EMA, a regroup)
            compute_losses   return {term name: weighted loss}; no side effects
            (backward)
            before_optimizer_step  gradients ready, weights not yet changed (official EMA timing)
            (optimiser step)
            after_step       after the optimiser step (EMA, memory banks, state updates)
        evaluate:  embed -> predict -> NMI/ACC/ARI
        on_epoch_end
        checkpoint               state.model, pseudo-labels, centres, each plugin's state_dict()

The trainer calls the implementations one by one (``clusterkit.plugin_manager.HookDispatcher``):
in pluggy's order, each with the arguments it names, and an error names its plugin.  Hook
wrappers (``wrapper=True`` / ``hookwrapper=True``) are refused when the recipe is loaded.

The state contract:

* ``compute_losses`` has no side effects; state changes are applied in ``after_step``, which
  runs only after a real optimiser step (a non-finite step may be skipped).
* A plugin's state that must survive a resume lives in one of two places, both in every
  checkpoint: network modules (trained weights, an EMA target) in ``state.model``; everything
  else it keeps (a memory bank, group features, counters, per-sample labels, fitted centres)
  in the plugin, returned by ``Plugin.state_dict()`` and restored by ``Plugin.load_state_dict()``.
  ``state.model`` holds no module that is only a container for buffers.
* ``state.features(split)`` returns the same tensor object until the next optimiser step;
  work memoised on that object (``kmeans_e_step``'s k-means) is valid while it is the same.
* ``state.log(name, value)`` records a scalar for the current epoch only.

Shared objects:

* ``state`` (:class:`clusterkit.state.TrainState`): recipe, device, epoch, step,
  ``state.model`` (an ``nn.ModuleDict`` holding the ``backbone`` and every plugin's
  network modules: all of it is checkpointed), ``state.pseudo_labels`` (the
  E-step's labels of the training set), ``state.in_warmup``, and
  ``state.features(split)`` (the embeddings of a split, computed once per step).
* ``cache`` (:class:`clusterkit.state.StepCache`): the step's two augmented views,
  their dataset indices, and lazily computed named outputs ``cache["q", view]``: each
  output is computed at most once per step, by whichever plugin registered it.
"""

from __future__ import annotations

import pluggy

PROJECT = "clusterkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def setup(state):
    """Build your modules once, before the optimiser exists.

    Add network modules to ``state.model`` (an ``nn.ModuleDict``; the core has put the timm
    ``backbone`` there); build other state (banks, counters) on ``state.device`` in the plugin.
    Return a list of :class:`clusterkit.state.ParamGroup` for parameters that need their own
    lr multiplier or weight decay, or None.  Parameters you do not return go to the default group.
    """


@hookspec
def register_outputs(state):
    """Name the per-step tensors you can compute.

    Return ``{name: fn}`` where ``fn(cache, view) -> Tensor`` computes output ``name``
    of view ``view`` (0 or 1), reading other outputs through ``cache[other, view]``.
    The core computes each (name, view) at most once per step.  Two plugins may not
    register the same name.
    """


@hookspec
def on_epoch_start(state):
    """Called at the start of every epoch, before the E-step."""


@hookspec
def e_step(state):
    """The E-step: cluster the training set and publish the result.

    Runs before the first epoch and then every ``e_step.every`` epochs.  Typically
    reads ``state.features("train")`` and sets ``state.pseudo_labels`` (LongTensor (N,))
    and ``state.centers`` (K, D).  Returns nothing.
    """


@hookspec(firstresult=True)
def embed(state, images):
    """Map a batch of evaluation images to the features used for clustering.

    ``images``: float (B, C, S, S), already resized and normalised, on ``state.device``.
    Called under ``torch.no_grad()`` with the model in eval mode.  Return (B, D).
    The first plugin that returns a value wins; without any, the core uses the
    backbone's pooled output.
    """


@hookspec
def on_step_start(state, cache):
    """Called before the forward of every training step."""


@hookspec
def compute_losses(state, cache):
    """Return this plugin's loss terms for the step: ``{name: weighted scalar tensor}``.

    Apply your own weight (and warm-up gate) before returning: the core sums every
    term of every plugin, logs each one, and runs backward and the optimiser step.
    Term names must be unique across plugins.

    No side effects: a step whose loss is not finite may be skipped
    (``run.nonfinite: skip``), so state changes computed here (updated group features,
    queue entries) go into the step cache (``cache.put``) and are applied in
    ``after_step``, which runs only after a real optimiser step.
    """


@hookspec
def before_optimizer_step(state, cache):
    """Called after backward and just before the optimiser step, only for a step that is
    applied: the parameters are still those the losses saw.  The official ProPos/DigPro
    code updates its EMA target here (inside the forward, from the pre-step weights)."""


@hookspec
def after_step(state, cache):
    """Called after the optimiser step (gradients are applied): EMA updates,
    memory banks, periodic regrouping, and the state changes ``compute_losses`` left in
    the step cache.  Skipped steps (``run.nonfinite: skip``) get no call."""


@hookspec(firstresult=True)
def predict(state, features, fit):
    """Turn evaluation features (N, D) into cluster predictions.

    Return :class:`clusterkit.state.Prediction` (labels (N,), confidence (N,)).
    The first plugin that returns a value wins (k-means on features, or a cluster head).

    ``fit`` is True when the trainer evaluates: ``features`` are the whole evaluation
    set, and a rule fitted to the data (k-means) is fitted here; keep what it needs to
    predict new data (e.g. the centres) in the plugin and return it from
    ``Plugin.state_dict()``, which the checkpoint saves.
    ``fit`` is False when a finished run predicts new images (``clusterkit predict``,
    ``clusterkit.load``): apply the kept rule (assign to the saved centres), never refit.
    A rule without fitted state (a cluster head) may ignore ``fit``.
    """


@hookspec
def on_epoch_end(state, metrics):
    """Called after evaluation with that epoch's record (``metrics``: dict of floats,
    loss means, and NMI/ACC/ARI when evaluated).  Plugins may add keys to it."""

"""Orbax checkpoints of a training run: parameters, optimizer state, step and data position.

A checkpoint is the directory <output_dir>/checkpoints/<step>/ with two items:
    state  {"params": ..., "opt_state": ...}   (sharded arrays, restored onto the run's mesh)
    meta   {"step", "data_position", "config"}  (JSON)
The data position is the number of training batches consumed; batches are a pure function of
(seed, position), so restoring it continues the data stream exactly. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import uuid

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be written, or a checkpoint that cannot be restored."""


def check_writable(directory: str) -> None:
    """Creates `directory` and writes/removes a probe file; CheckpointError if that fails."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_probe_{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {directory!r} is not writable "
                              f"({type(e).__name__}: {e}); choose another output_dir") from None


class Checkpointer:
    """Saves and restores the training state under `directory`, keeping the last `keep`."""

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Starts writing checkpoint `step` (asynchronously; `wait` blocks until done)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, meta) of checkpoint `step`, placed like the abstract trees
        (jax.ShapeDtypeStruct with shardings). CheckpointError when it cannot be read."""
        where = os.path.join(self.directory, str(step))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"params": abstract_params,
                                                "opt_state": abstract_opt_state}),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"checkpoint {where} could not be restored (corrupt, "
                                  f"incomplete or from a different model): {type(e).__name__}: "
                                  f"{str(e)[:500]}. Nothing was overwritten; delete it or "
                                  f"choose another output_dir.") from None
        meta = out.meta
        if not isinstance(meta, dict) or meta.get("step") != step or "config" not in meta:
            raise CheckpointError(f"checkpoint {where} has invalid metadata {meta!r}. Nothing "
                                  f"was overwritten.")
        state = out.state
        expected = jax.tree.structure({"params": abstract_params,
                                       "opt_state": abstract_opt_state})
        if jax.tree.structure(state) != expected:
            raise CheckpointError(f"checkpoint {where} holds a different state structure than "
                                  f"this run's model and optimizer. Nothing was overwritten.")
        return state["params"], state["opt_state"], meta

    def close(self) -> None:
        self._manager.close()

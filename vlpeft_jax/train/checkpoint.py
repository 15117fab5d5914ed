"""Train-state checkpoints with orbax (DESIGN invariant 8).

Each checkpoint ``<directory>/<step>/`` holds two orbax items: ``state`` (the state's array leaves,
keyed by their flattening index) and ``meta`` (JSON: the leaves' key paths plus whatever the caller
records, e.g. the stage index and the position within the stage, so that resuming is exact). Orbax
writes into a temporary directory and renames it when complete, so a killed run never leaves a
half-written checkpoint that looks finished; leftovers are removed when the manager is next opened.
Saving is asynchronous by default: orbax copies the arrays to host memory before ``save`` returns
(so donating the state to the next step is safe) and writes in a background thread.

Restoring needs the state's structure (the caller rebuilds it from the config, see
:func:`vlpeft_jax.train.state.abstract_state`); the stored key paths are checked against it, so a
checkpoint from a different model or stage plan fails with a clear :class:`CheckpointError` instead of
loading leaves into the wrong places. If the newest checkpoint cannot be read (truncated or garbled
files), :meth:`Checkpointer.restore_latest` warns, moves it aside to ``<directory>.corrupt/`` and falls
back to the previous one.

Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp() + "/checkpoints", keep=2, async_save=False)
    >>> ckpt.save(3, {"w": jnp.ones(2)}, {"stage_index": 0})
    >>> state, meta = ckpt.restore_latest(lambda meta: {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    >>> state["w"].tolist(), meta["stage_index"], meta["step"]
    ([1.0, 1.0], 0, 3)
    >>> ckpt.close()
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from vlpeft_jax.errors import CheckpointError
from vlpeft_jax.train.state import state_leaf_paths

logger = logging.getLogger(__name__)


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint written for another model or stage plan (different leaves or shapes): never
    quarantined or overwritten, the run is refused."""


def _warn(message: str) -> None:
    logger.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _with_sharding(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _quiet_closed_loop_callbacks() -> None:
    """After orbax fails to restore a damaged checkpoint, tensorstore callbacks of the failed read can still fire
    once its event loop is closed; Python reports each as an unraisable ``RuntimeError('Event loop is closed')``
    traceback (dozens of them), which buries the one warning that matters. Drop exactly those, nothing else."""
    previous = sys.unraisablehook
    if getattr(previous, "vlpeft_closed_loop_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.vlpeft_closed_loop_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores train states under one directory, keeping the newest ``keep``.

    Args:
      directory: where the step directories go (created if missing).
      keep: number of checkpoints kept (>= 2 so that a corrupt newest one has a fallback).
      async_save: write in a background thread (call :meth:`wait_until_finished` or :meth:`close`).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None if there is none)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (any pytree of arrays) and the JSON-serialisable ``meta`` as checkpoint ``step``."""
        leaves = jax.tree.leaves(state)
        items = {f"{i:06d}": x for i, x in enumerate(leaves)}
        meta = {**meta, "step": int(step), "leaf_paths": state_leaf_paths(state),
                "leaf_shapes": [[list(x.shape), str(x.dtype)] for x in leaves]}
        self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(items),
                                                              meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` of checkpoint ``step``."""
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or "leaf_paths" not in meta:
            raise ValueError(f"checkpoint {step} has no valid metadata")
        return meta

    def restore(self, step: int, abstract: Any, meta: dict[str, Any] | None = None) -> Any:
        """Restores checkpoint ``step`` into the structure of ``abstract`` (arrays or ``ShapeDtypeStruct``,
        whose shardings are used when present).

        Raises:
          CheckpointError: the checkpoint's leaves do not match ``abstract``'s key paths.
        """
        meta = self.read_meta(step) if meta is None else meta
        expected = state_leaf_paths(abstract)
        stored = meta["leaf_paths"]
        if stored != expected:
            pairs = zip(stored, expected, strict=False)
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(stored), len(expected)))
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match the current model/stage plan: it has "
                f"{len(stored)} leaves, the state has {len(expected)}; first difference at leaf {first}: "
                f"{stored[first] if first < len(stored) else '<none>'} vs "
                f"{expected[first] if first < len(expected) else '<none>'}")
        leaves, treedef = jax.tree.flatten(abstract)
        # a different shape is a different model or plan, not corruption: refuse and touch nothing
        for path, stored_shape, x in zip(expected, meta.get("leaf_shapes") or [None] * len(leaves), leaves,
                                         strict=True):
            if stored_shape is not None and (list(x.shape), str(x.dtype)) != (stored_shape[0], stored_shape[1]):
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory / str(step)} was written for another model or plan: {path} has "
                    f"shape {tuple(stored_shape[0])} ({stored_shape[1]}) there and {tuple(x.shape)} ({x.dtype}) in "
                    f"this run; nothing was changed; use a new run directory (or the settings it was written with)")
        target = {f"{i:06d}": _with_sharding(x) for i, x in enumerate(leaves)}
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        return jax.tree.unflatten(treedef, [restored[k] for k in sorted(target)])

    def restore_latest(self, build_abstract: Callable[[dict[str, Any]], Any]) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest readable checkpoint; None if there is none.

        Args:
          build_abstract: ``meta -> abstract state`` (the structure depends on what ``meta`` records, e.g.
            which stage the run was in).

        A checkpoint that cannot be read is reported with a warning (logged and printed), moved to
        ``<directory>.corrupt/`` and the previous one is tried.

        Raises:
          CheckpointError: checkpoints exist but none can be read, or one does not match the state.
        """
        self.wait_until_finished()
        steps = self.steps()
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                self._quarantine(step, e)
                continue
            abstract = build_abstract(meta)
            try:
                return self.restore(step, abstract, meta), meta
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                self._quarantine(step, e)
        if steps:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {steps}; the "
                                  f"unreadable ones were moved to {self._corrupt_dir()})")
        return None

    def _corrupt_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + ".corrupt")

    def _quarantine(self, step: int, error: Exception) -> None:
        _quiet_closed_loop_callbacks()
        dest = self._corrupt_dir() / str(step)
        n = 1
        while dest.exists():
            dest = self._corrupt_dir() / f"{step}.{n}"
            n += 1
        _warn(f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: "
              f"{str(error).splitlines()[0][:300] if str(error) else ''}); moved it to {dest} and falling back "
              f"to the previous checkpoint")
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


EMPTY_TREE = "EMPTY"


def save_tree(directory: str | Path, tree: Any) -> Path:
    """Writes a parameter tree (e.g. a run's final parameters, a pretrained base) in the checkpoint format.

    The same orbax layout as the train-state checkpoints (one format on disk): ``directory/0/`` with the
    leaves and their key paths, written to a temporary directory and renamed when complete.
    """
    if not jax.tree.leaves(tree):  # orbax refuses empty items: an empty tree is a marker file
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / EMPTY_TREE).write_text("no leaves\n")
        return Path(directory)
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        ckpt.save(0, tree, {"kind": "tree"})
    finally:
        ckpt.close()
    return Path(directory)


def has_tree(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete tree written by :func:`save_tree`."""
    return (Path(directory) / "0" / "meta").is_dir() or (Path(directory) / EMPTY_TREE).is_file()


def load_tree(directory: str | Path, abstract: Any) -> Any:
    """Reads a tree written by :func:`save_tree` into the structure of ``abstract`` (its key paths are checked).

    Raises:
      CheckpointError: nothing readable is there, or the stored tree does not match ``abstract``.
    """
    if not has_tree(directory):
        raise CheckpointError(f"{directory} holds no saved parameters")
    if (Path(directory) / EMPTY_TREE).is_file():
        if jax.tree.leaves(abstract):
            raise CheckpointError(f"{directory} holds an empty tree; the model expects parameters there")
        return abstract
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        return ckpt.restore(0, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable bytes: name the directory and what to do
        raise CheckpointError(f"the parameters in {directory} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); the files are damaged: restore "
                              f"them or train again into a new directory") from None
    finally:
        ckpt.close()
